"""The benchmark behind ``python -m addax_kernels bench`` (docs/benchmark.md).

* :mod:`.baselines` — the PyTorch code the fused ops replace (MeZO's and ZO-Bench's trainers);
* :mod:`.kernels` — fused ops vs the copy roofline and the baselines; the ZO-Bench-family updates;
* :mod:`.host` — host microseconds per op and per optimizer step;
* :mod:`.steps` — full MeZO and Addax steps on an OPT model built from config, captured graphs;
* :mod:`.timing` — device time, host time and peak memory; :mod:`.report`, :mod:`.plot` — output.
"""
