"""A minimal real RS-LoRA trainer: inject RSLoRALinear, train only v, save a v1 checkpoint.

Method (spec 3.2, NOLA-style; Koohpayegani et al., ICLR 2024, arXiv 2310.02556): every targeted
projection gets A~ = sum_l v_A[l] P~_A[l], B~ = sum_l v_B[l] P~_B[l], dW = s B~ A~ with
s = alpha / (r k). P~ comes from RSG-1 (seed mode), so the saved checkpoint holds 2k floats per
module. Initialization per spec 3.5: v_B = 0 (dW = 0 at step 0), v_A ~ U(-1, 1).

This is deliberately small: next-token loss on fixed-length windows, Adam on the v vectors, CPU.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from rslora_deploy.adapters import rsg
from rslora_deploy.adapters.layers import RSLoRALinear
from rslora_deploy.adapters.rslora_v1 import effective_scale
from rslora_deploy.adapters.rslora_writer import RsloraSpec, write_checkpoint

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "c_attn",
    "c_proj",
    "c_fc",
)


@dataclass
class TrainConfig:
    """Trainer settings (CLI flags of ``adapter train``)."""

    r: int = 64
    k: int = 8
    alpha: float = 1.0
    steps: int = 200
    lr: float = 0.05
    seq_len: int = 128
    batch_size: int = 4
    seed: int = 0
    task_id: str = ""
    targets: tuple[str, ...] = DEFAULT_TARGETS
    threads: int | None = None
    log_every: int = 10
    extra: dict[str, Any] = field(default_factory=dict)


def target_names(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Linear/Conv1D modules whose last name component is in ``targets``."""
    wanted = set(targets)
    out = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if name.rpartition(".")[2] in wanted and (
            isinstance(module, nn.Linear) or kind == "Conv1D"
        ):
            out.append(name)
    return out


def inject(model: nn.Module, names: list[str], cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """Replace each named layer by an RSLoRALinear; return the checkpoint's ``modules`` table."""
    from rslora_deploy.adapters.merge_math import layer_layout, logical_shape

    scale = effective_scale(cfg.alpha, cfg.r, cfg.k, "alpha_over_r", "inv_sqrt_k")
    init_rng = np.random.default_rng(cfg.seed)
    modules = {}
    for name in names:
        base = model.get_submodule(name)
        layout = layer_layout(base, name)
        d_out, d_in = logical_shape(base, layout)
        p_a = rsg.generate(rsg.derive_key(cfg.seed, cfg.task_id, name, "A"), cfg.k, cfg.r, d_in)
        p_b = rsg.generate(rsg.derive_key(cfg.seed, cfg.task_id, name, "B"), cfg.k, d_out, cfg.r)
        v_a = torch.from_numpy(init_rng.uniform(-1.0, 1.0, cfg.k))
        wrapped = RSLoRALinear(base, torch.from_numpy(p_a), torch.from_numpy(p_b), scale, v_a)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapped)
        modules[name] = {"d_in": d_in, "d_out": d_out, "layout": layout}
    return modules


def token_windows(tokenizer: Any, texts: Iterable[str], seq_len: int) -> torch.Tensor:
    """Concatenate documents (EOS between them) and cut into (n, seq_len) windows."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        from rslora_deploy.errors import ConfigError

        raise ConfigError(
            f"training text has {len(ids)} tokens, fewer than one window of "
            f"seq_len={seq_len}; give more text or a smaller --seq-len"
        )
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def mean_loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats/token) over all windows."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]
        out = model(input_ids=batch, labels=batch)
        tokens = batch.numel() - batch.shape[0]
        total += float(out.loss) * tokens
        count += tokens
    return total / count


def train(model: nn.Module, windows: torch.Tensor, cfg: TrainConfig) -> dict[str, Any]:
    """Train the injected v vectors with Adam on random windows; returns the loss curve."""
    params = [p for n, p in model.named_parameters() if n.endswith((".v_A", ".v_B"))]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    curve = []
    started = time.perf_counter()
    model.train()
    for step in range(1, cfg.steps + 1):
        rows = torch.randint(0, windows.shape[0], (cfg.batch_size,), generator=gen)
        batch = windows[rows]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not math.isfinite(loss.item()):
            from rslora_deploy.errors import NonFiniteError

            raise NonFiniteError(f"training loss became {loss.item()} at step {step}; lower --lr")
        curve.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            logger.info(
                "step %d/%d loss %.4f (%.1f s)",
                step,
                cfg.steps,
                float(np.mean(curve[-cfg.log_every :])),
                time.perf_counter() - started,
            )
    model.eval()
    return {"loss_curve": curve, "seconds": time.perf_counter() - started}


def collect_v(model: nn.Module) -> dict[str, np.ndarray]:
    """The trained v vectors under their checkpoint names (``{module}.rslora_v_A`` ...)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, RSLoRALinear):
            out[f"{name}.rslora_v_A"] = module.v_A.detach().numpy().astype(np.float32)
            out[f"{name}.rslora_v_B"] = module.v_B.detach().numpy().astype(np.float32)
    return out


def train_adapter(
    base_dir: Path, texts: Iterable[str], out_dir: Path, cfg: TrainConfig
) -> dict[str, Any]:
    """Load the base, inject, train and save a seed-mode RS-LoRA v1 checkpoint to ``out_dir``.

    Returns:
        Summary: steps, seconds, first/last loss, trainable parameter count, modules.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    base_dir = Path(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, trust_remote_code=False, use_safetensors=True
    )
    for param in model.parameters():
        param.requires_grad_(False)
    windows = token_windows(tokenizer, texts, cfg.seq_len)
    names = target_names(model, cfg.targets)
    modules = inject(model, names, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "training %d v scalars in %d modules on %d windows", trainable, len(names), windows.shape[0]
    )
    result = train(model, windows, cfg)
    spec = _checkpoint_spec(model, base_dir, modules, cfg)
    write_checkpoint(out_dir, spec, collect_v(model))
    curve = result["loss_curve"]
    return {
        "steps": cfg.steps,
        "seconds": round(result["seconds"], 1),
        "first_loss": curve[0],
        "last10_loss": float(np.mean(curve[-10:])),
        "trainable_parameters": trainable,
        "modules": len(names),
        "windows": int(windows.shape[0]),
    }


def _checkpoint_spec(
    model: PreTrainedModel, base_dir: Path, modules: dict[str, dict[str, Any]], cfg: TrainConfig
) -> RsloraSpec:
    """The checkpoint's config: hyper-parameters, base fingerprints and what made it."""
    import transformers

    from rslora_deploy.adapters.base_hash import config_sha256, target_weights_sha256

    return RsloraSpec(
        modules=modules,
        r=cfg.r,
        k=cfg.k,
        alpha=cfg.alpha,
        seed=cfg.seed,
        task_id=cfg.task_id,
        base_model={
            "name_or_path": str(cfg.extra.get("base_name", base_dir.name)),
            "revision": str(cfg.extra.get("base_revision", "")),
            "architecture": (model.config.architectures or [type(model).__name__])[0],
            "config_sha256": config_sha256(base_dir),
            "target_weights_sha256": target_weights_sha256(base_dir, modules)[0],
        },
        init={"v_A": "uniform(-1,1) numpy default_rng(seed)", "v_B": "zeros"},
        created_by={
            "tool": "rslora-deploy adapter train",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "steps": cfg.steps,
            "lr": cfg.lr,
            "seq_len": cfg.seq_len,
            "batch_size": cfg.batch_size,
            **cfg.extra.get("created_by", {}),
        },
    )
