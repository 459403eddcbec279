"""Type aliases of the public ops' signatures."""

from typing import Sequence, Union

import torch

TensorList = Union[torch.Tensor, Sequence[torch.Tensor]]
ScalarLike = Union[float, int, torch.Tensor]
SeedLike = Union[int, torch.Tensor]
