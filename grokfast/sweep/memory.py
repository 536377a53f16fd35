"""Device memory: the estimated bytes one model needs to train (``bytes_per_model``), the free memory of a
device, and the check that the models trained at once fit before any work."""
from __future__ import annotations

import os

from ..config import ConfigError, ModelConfig, TrainConfig
from .runs import RunSpec


def bytes_per_model(mcfg: ModelConfig, tcfg: TrainConfig, n_train: int, n_test: int) -> int:
    """Estimated device bytes to train one model (float32 unless stated).

    state: N parameters x (weights, gradients, AdamW m and v, filter state: 1 for EMA, window for MA);
    activations of one step over B = batch_size (or n_train) examples, kept for backward (x2 for their
    gradients): per example and layer, n_ctx x (8 d_model + 3 n_heads n_ctx + 2 d_mlp) floats, and the
    logits (float32, their float64 copy and its gradient: 5 floats per class); evaluation over chunks
    of up to 32768 examples without gradients; the token tensors (int64, n_ctx + 1 per example).
    An estimate with a margin, not a measurement: the caller adds its own headroom."""
    N = mcfg.n_params()
    filt = {"none": 0, "ema": 1, "ma": tcfg.window}[tcfg.grokfast]
    state = 4 * N * (4 + filt)
    per_ex = mcfg.n_layers * mcfg.n_ctx * (8 * mcfg.d_model + 3 * mcfg.n_heads * mcfg.n_ctx + 2 * mcfg.d_mlp)
    per_ex += 5 * mcfg.d_vocab_out
    B = tcfg.batch_size or n_train
    train_act = 4 * per_ex * B * 2
    eval_act = 4 * per_ex * min(32768, max(n_train, n_test))
    data = 8 * (n_train + n_test) * (mcfg.n_ctx + 1)
    return int(state + max(train_act, eval_act) + data)


def available_bytes(device) -> int:
    """Free memory of the device: CUDA's free bytes, or on the CPU the RAM the OS reports available,
    shared between the processes of this machine under torchrun (LOCAL_WORLD_SIZE)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return free // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def check_memory(runs: list[RunSpec], models_at_once: int, available: int, headroom: float = 0.8) -> int:
    """Raise ConfigError unless ``models_at_once`` of the largest run fit in ``headroom`` x ``available``
    bytes; the message says how many fit. Returns the bytes one model needs."""
    need = max((bytes_per_model(r.model, r.train, r.n_train, r.n_test) for r in runs), default=0)
    budget = headroom * available
    if need * models_at_once > budget:
        fit = int(budget // need)
        if fit == 0:
            raise ConfigError(f"one model needs about {_human(need)} but only {_human(available)} are free "
                              f"(0 models fit): use a smaller model, p or batch, or free memory")
        raise ConfigError(f"{models_at_once} models at once need about {_human(models_at_once * need)} but only "
                          f"{_human(available)} are free: {fit} models fit, pass --models-per-launch {fit}")
    return need


def _human(n: float) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} bytes"
