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

  peft-combine-bert  LoraModel.add_weighted_adapter on three LoRA adapters of the bert model, with
                     no task head (PEFT refuses to combine adapters that have modules_to_save)
                     (sources/{a,b,c}/: r 4, 4, 2; lora_alpha 8, 16, 4), every combination type
                     PEFT has that draws nothing at random, saved as combined/<name>/ with
                     deltas.npz (per module B·A·scaling of the combined adapter, [out, in])

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


COMBINE_SOURCES = {"a": (4, 8), "b": (4, 16), "c": (2, 4)}
# name: (adapters, weights, combination_type, extra add_weighted_adapter arguments)
COMBINATIONS = {
    "linear": (["a", "b"], [0.7, 0.3], "linear", {}),
    "linear_negative": (["a", "b"], [1.0, -0.5], "linear", {}),
    "cat": (["a", "b", "c"], [0.5, 0.3, 0.2], "cat", {}),
    "svd": (["a", "b", "c"], [0.5, 0.3, 0.2], "svd", {}),
    "svd_rank2": (["a", "b"], [0.6, 0.4], "svd", {"svd_rank": 2}),
    "ties": (["a", "b"], [0.6, 0.4], "ties", {"density": 0.5, "majority_sign_method": "total"}),
    "ties_frequency": (["a", "b"], [0.6, 0.4], "ties", {"density": 0.5, "majority_sign_method": "frequency"}),
    "magnitude_prune": (["a", "b"], [0.6, 0.4], "magnitude_prune", {"density": 0.5}),
    "dare_linear_full": (["a", "b"], [0.6, 0.4], "dare_linear", {"density": 1.0}),
    "dare_ties_full": (["a", "b"], [0.6, 0.4], "dare_ties", {"density": 1.0}),
}


def save_selected(model, adapter: str, out_dir: Path) -> None:
    """save_pretrained of one named adapter, its files moved into out_dir itself."""
    staging = out_dir.with_name(out_dir.name + ".staging")
    if staging.exists():
        shutil.rmtree(staging)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(staging), selected_adapters=[adapter])
    saved = staging / adapter if (staging / adapter).is_dir() else staging
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in ["adapter_config.json", "adapter_model.safetensors"]:
        shutil.move(str(saved / file), str(out_dir / file))
    shutil.rmtree(staging)


def record_combine(out_dir: Path) -> dict:
    from peft.tuners.lora import LoraLayer

    rec = R.base_recording("bert")
    torch.manual_seed(R.seed_of("combine", "init"))
    names = list(COMBINE_SOURCES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r0, a0 = COMBINE_SOURCES[names[0]]
        model = get_peft_model(rec.model, LoraConfig(r=r0, lora_alpha=a0,
                                                     target_modules=["query", "value"],
                                                     init_lora_weights="gaussian"), adapter_name=names[0])
        for name in names[1:]:
            r, alpha = COMBINE_SOURCES[name]
            model.add_adapter(name, LoraConfig(r=r, lora_alpha=alpha,
                                               target_modules=["query", "value"], init_lora_weights="gaussian"))
    g = R.gen("combine", "factors")
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if ".lora_A." in n or ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for name in names:
        save_selected(model, name, out_dir / "sources" / name)
    recipe = {}
    for combined, (adapters, weights, kind, extra) in COMBINATIONS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.add_weighted_adapter(adapters, weights, combined, combination_type=kind, **extra)
        target = out_dir / "combined" / combined
        save_selected(model, combined, target)
        deltas = {}
        for module_name, module in model.named_modules():
            if isinstance(module, LoraLayer) and combined in module.lora_A:
                path = module_name.replace("base_model.model.", "", 1)
                deltas[path] = module.get_delta_weight(combined).detach().numpy().astype("float32")
        R.G.write_npz(target / "deltas.npz", deltas)
        config = model.peft_config[combined]
        recipe[combined] = {"adapters": adapters, "weights": weights, "combination_type": kind, **extra,
                            "r": config.r, "lora_alpha": config.lora_alpha}
        model.delete_adapter(combined)
    summary = {"sources": {n: {"r": r, "lora_alpha": a} for n, (r, a) in COMBINE_SOURCES.items()},
               "combinations": recipe,
               "versions": {"torch": torch.__version__, "peft": R.peft.__version__}}
    (out_dir / "recording.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join([*CONFIGS, "peft-combine-bert"]), help="comma-separated recordings")
    parser.add_argument("--out", type=Path, default=R.REFS_DIR)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for name in args.only.split(","):
        if name == "peft-combine-bert":
            record_combine(args.out / name)
            print(f"{name}: {len(COMBINATIONS)} combinations")
            continue
        if name not in CONFIGS:
            sys.exit(f"unknown recording {name!r}; choose from {', '.join(CONFIGS)}")
        summary = record(name, args.out / name)
        print(f"{name}: adapter moves the outputs by {summary['max_abs_adapter_vs_base']:.3g}, "
              f"merged vs unmerged {summary['max_abs_unmerged_vs_merged']:.3g}, {len(summary['tensors'])} tensors")


if __name__ == "__main__":
    main()
