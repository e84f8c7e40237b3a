#!/usr/bin/env python3
"""Record HF PEFT adapters of the LoRA family beyond LoRA for graft's parity tests.

Recordings (each into models/references/<name>/), on the committed fixtures' models rebuilt by
record_references.base_recording (bert: SEQ_CLS with PEFT's perturbed classifier in
modules_to_save; llama: CAUSAL_LM):

  peft-loha-<arch>   LoHaConfig
  peft-lokr-<arch>   LoKrConfig (bert: r=2, full lokr_w1 + factored w2; llama: decompose_both,
                     decompose_factor=4, a rank_pattern that makes the FFN's w2 full)
  peft-dora-<arch>   LoraConfig(use_dora=True), magnitudes perturbed
  peft-ia3-<arch>    IA3Config with feedforward_modules

Every adapter tensor is drawn anew (seeded, sorted parameter-name order) so the adapter changes the
outputs. Each folder holds adapter_config.json + adapter_model.safetensors (PeftModel.save_pretrained),
outputs.npz (the PeftModel, unmerged, on fixtures/<arch>-legacy/inputs.npz), merged_outputs.npz (after
merge_and_unload()) and recording.json (config, check figures, tensor shapes).

Usage (from the repository root, in models/requirements.txt's environment):
  python models/record_lora_family.py [--only peft-loha-bert,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

if os.environ.get("PYTHONHASHSEED") != "0" and __name__ == "__main__":
    os.environ["PYTHONHASHSEED"] = "0"  # PEFT writes target_modules from a set
    os.execv(sys.executable, [sys.executable, *sys.argv])

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))

import record_references as R  # noqa: E402

import torch  # noqa: E402
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402

TASK = {"bert": "SEQ_CLS", "llama": "CAUSAL_LM"}

CONFIGS = {
    "peft-loha-bert": lambda: LoHaConfig(task_type="SEQ_CLS", r=4, alpha=8, target_modules=["query", "value"]),
    "peft-loha-llama": lambda: LoHaConfig(
        task_type="CAUSAL_LM", r=4, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 4},
    ),
    "peft-lokr-bert": lambda: LoKrConfig(task_type="SEQ_CLS", r=2, alpha=4, target_modules=["query", "value"]),
    "peft-lokr-llama": lambda: LoKrConfig(
        task_type="CAUSAL_LM", r=1, alpha=2, target_modules=["q_proj", "v_proj", "down_proj"],
        decompose_both=True, decompose_factor=4, rank_pattern={"down_proj": 8},
    ),
    "peft-dora-bert": lambda: LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=True,
        init_lora_weights="gaussian",
    ),
    "peft-dora-llama": lambda: LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2}, use_dora=True, init_lora_weights="gaussian",
    ),
    "peft-ia3-bert": lambda: IA3Config(
        task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
    ),
    "peft-ia3-llama": lambda: IA3Config(
        task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
    ),
}

ADAPTER_MARKERS = ("hada_", "lokr_", "lora_A", "lora_B", "lora_magnitude_vector", "ia3_l")


@torch.no_grad()
def randomize(model, name: str) -> list[str]:
    """Every adapter parameter drawn anew, in sorted name order: IA3 vectors 1 + 0.3·N(0,1),
    DoRA magnitudes × (1 + 0.1·N(0,1)), everything else 0.1·N(0,1)."""
    g = R.gen("lora-family", name)
    touched = []
    for n, p in sorted(model.named_parameters()):
        if not any(m in n for m in ADAPTER_MARKERS):
            continue
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if "ia3_l" in n:
            p.copy_(1.0 + 0.3 * noise)
        elif "lora_magnitude_vector" in n:
            p.mul_(1.0 + 0.1 * noise)
        else:
            p.copy_(0.1 * noise)
        touched.append(n.replace(".default", ""))
    return touched


def record(name: str, out_dir: Path) -> dict:
    arch = name.rsplit("-", 1)[1]
    rec = R.base_recording(arch)
    feeds = R.fixture_arrays(arch, "legacy", "inputs")
    base_out = R.run_outputs(rec, rec.model, feeds)
    config = CONFIGS[name]()
    torch.manual_seed(R.seed_of("lora-family", name, "init"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(rec.model, config)
    touched = randomize(model, name)
    mts = R.perturb_modules_to_save(model, R.gen("lora-family", name, "modules_to_save"))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    R.save_adapter(model, out_dir)
    model.eval()
    out = R.run_outputs(rec, model, feeds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = model.merge_and_unload()
    merged.eval()
    merged_out = R.run_outputs(rec, merged, feeds)
    d_merge = R.max_diff(out, merged_out)
    d_base = R.max_diff(out, base_out)
    if d_merge > R.MERGE_TOL:
        raise AssertionError(f"{name}: unmerged vs merged differ by {d_merge:.3g}")
    if d_base < 1e-2:
        raise AssertionError(f"{name}: the adapter barely changes the outputs ({d_base:.3g})")
    R.G.write_npz(out_dir / "outputs.npz", out)
    R.G.write_npz(out_dir / "merged_outputs.npz", merged_out)
    fresh = R.base_recording(arch)
    loaded = PeftModel.from_pretrained(fresh.model, str(out_dir))
    loaded.eval()
    d_reload = R.max_diff(R.run_outputs(fresh, loaded, feeds), out)
    if d_reload != 0.0:
        raise AssertionError(f"{name}: reloaded adapter differs from outputs.npz by {d_reload:.3g}")
    summary = {
        "base_fixture": f"{arch}-legacy (same weights and inputs as {arch}-dynamo)",
        "task_type": TASK[arch],
        "max_abs_unmerged_vs_merged": d_merge,
        "max_abs_adapter_vs_base": d_base,
        "max_abs_reloaded_vs_outputs": d_reload,
        "randomized": touched,
        "modules_to_save_params_perturbed": [n.replace(".default", "") for n in mts],
        "tensors": R.safetensors_summary(out_dir / "adapter_model.safetensors"),
        "versions": {"torch": torch.__version__, "peft": R.peft.__version__, "transformers": R.transformers.__version__},
    }
    (out_dir / "recording.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(CONFIGS), help="comma-separated recordings")
    parser.add_argument("--out", type=Path, default=R.REFS_DIR)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for name in args.only.split(","):
        if name not in CONFIGS:
            sys.exit(f"unknown recording {name!r}; choose from {', '.join(CONFIGS)}")
        summary = record(name, args.out / name)
        print(f"{name}: adapter moves the outputs by {summary['max_abs_adapter_vs_base']:.3g}, "
              f"merged vs unmerged {summary['max_abs_unmerged_vs_merged']:.3g}, {len(summary['tensors'])} tensors")


if __name__ == "__main__":
    main()
