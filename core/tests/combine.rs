//! `graft combine`: weighted combinations of LoRA adapters (PEFT's `add_weighted_adapter`) on
//! adapter files PEFT saved (models/references/peft-bert) and a second adapter derived from it.
//! `cat` and full-rank `svd` must equal the weighted sum of the updates, `Σ wᵢ sᵢ Bᵢ Aᵢ`,
//! computed here independently; the other rules are checked against their definitions; and the
//! results load with `graft apply --from-peft`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;

/// Per module: `(A [r, in], B [out, r])` as row-major f64, and the file's shapes.
type Factors = BTreeMap<String, (Vec<f64>, Vec<usize>, Vec<f64>, Vec<usize>)>;

fn factors(dir: &Path) -> Factors {
    let mut out: Factors = BTreeMap::new();
    for (key, shape, values) in read_tensors(&dir.join("adapter_model.safetensors")) {
        let values: Vec<f64> = values.iter().map(|v| *v as f64).collect();
        let module = key.trim_start_matches("base_model.model.");
        if let Some(m) = module.strip_suffix(".lora_A.weight") {
            let entry = out.entry(m.to_owned()).or_default();
            (entry.0, entry.1) = (values, shape);
        } else if let Some(m) = module.strip_suffix(".lora_B.weight") {
            let entry = out.entry(m.to_owned()).or_default();
            (entry.2, entry.3) = (values, shape);
        }
    }
    out
}

/// `B · A` of one module, `[out, in]`.
fn update(a: &[f64], a_shape: &[usize], b: &[f64], b_shape: &[usize]) -> Vec<f64> {
    let (r, n_in, n_out) = (a_shape[0], a_shape[1], b_shape[0]);
    let mut out = vec![0.0; n_out * n_in];
    for i in 0..n_out {
        for k in 0..r {
            for j in 0..n_in {
                out[i * n_in + j] += b[i * r + k] * a[k * n_in + j];
            }
        }
    }
    out
}

/// A copy of `peft-bert` with every lora_B multiplied by `factor` and shifted by a pattern, so
/// the two adapters differ in more than scale.
fn derived_adapter(dir: &Path, factor: f32) -> PathBuf {
    let out = dir.join(format!("derived-{factor}"));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(
        reference("peft-bert").join("adapter_config.json"),
        out.join("adapter_config.json"),
    )
    .unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> =
        read_tensors(&reference("peft-bert").join("adapter_model.safetensors"))
            .into_iter()
            .map(|(key, shape, values)| {
                let values = if key.ends_with("lora_B.weight") {
                    values
                        .iter()
                        .enumerate()
                        .map(|(i, v)| v * factor + ((i % 7) as f32 - 3.0) * 0.01)
                        .collect()
                } else {
                    values
                };
                (key, shape, values)
            })
            .collect();
    write_safetensors(&out.join("adapter_model.safetensors"), &tensors);
    out
}

fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, values)| values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), data)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .unwrap();
            (name.clone(), view)
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, &None).unwrap()).unwrap();
}

fn combine(sources: &[&Path], weights: &str, extra: &[&str], out: &Path) -> serde_json::Value {
    let mut args = vec!["combine"];
    args.extend(sources.iter().map(|s| s.to_str().unwrap()));
    args.extend(["--weights", weights, "--json", "-o", out.to_str().unwrap()]);
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = run_graft(&args);
    assert_eq!(code, 0, "graft {}: {stdout}{stderr}", args.join(" "));
    serde_json::from_str(&stdout).unwrap()
}

fn max_abs(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .fold(0.0, |m, (x, y)| f64::max(m, (x - y).abs()))
}

/// peft-bert: r = 4, lora_alpha = 8, so every module's scale is 2.
const SCALE: f64 = 2.0;

#[test]
fn cat_and_full_rank_svd_equal_the_weighted_sum_of_updates() {
    let dir = tempfile::tempdir().unwrap();
    let first = reference("peft-bert");
    let second = derived_adapter(dir.path(), -0.5);
    let (w1, w2) = (0.7, -0.4);
    let sources = [factors(&first), factors(&second)];
    for (combination, rank, extra) in [("cat", 8, vec![]), ("svd", 8, vec!["--svd-rank", "8"])] {
        let out = dir.path().join(combination);
        let mut flags = vec!["--combination", combination];
        flags.extend(extra);
        let report = combine(&[&first, &second], "0.7,-0.4", &flags, &out);
        assert_eq!(report["r"], rank, "{combination}");
        let config = read_json(&out.join("adapter_config.json"));
        assert_eq!(config["r"], rank);
        assert_eq!(config["lora_alpha"], rank, "PEFT's combined scale is 1");
        let combined = factors(&out);
        assert_eq!(combined.len(), 4, "{combination}: modules");
        for (module, (a, a_shape, b, b_shape)) in &combined {
            let got = update(a, a_shape, b, b_shape);
            let parts: Vec<Vec<f64>> = sources
                .iter()
                .map(|s| {
                    let (a, a_shape, b, b_shape) = &s[module];
                    update(a, a_shape, b, b_shape)
                })
                .collect();
            let want: Vec<f64> = (0..got.len())
                .map(|i| SCALE * (w1 * parts[0][i] + w2 * parts[1][i]))
                .collect();
            let diff = max_abs(&got, &want);
            assert!(
                diff <= 1e-6,
                "{combination} {module}: update differs by {diff}"
            );
        }
    }
}

/// `svd` below the full rank is the best approximation of that rank (Eckart–Young): its error
/// is below that of another rank-4 candidate, the first adapter's own update.
#[test]
fn truncated_svd_is_the_best_approximation_of_its_rank() {
    let dir = tempfile::tempdir().unwrap();
    let first = reference("peft-bert");
    let second = derived_adapter(dir.path(), -0.5);
    let sources = [factors(&first), factors(&second)];
    let out = dir.path().join("svd4");
    let report = combine(
        &[&first, &second],
        "0.7,0.3",
        &["--combination", "svd"],
        &out,
    );
    assert_eq!(report["r"], 4, "default rank: the largest of the sources");
    let frobenius = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    for (module, (a, a_shape, b, b_shape)) in &factors(&out) {
        let parts: Vec<Vec<f64>> = sources
            .iter()
            .map(|s| {
                let (a, a_shape, b, b_shape) = &s[module];
                update(a, a_shape, b, b_shape)
            })
            .collect();
        let whole: Vec<f64> = (0..parts[0].len())
            .map(|i| SCALE * (0.7 * parts[0][i] + 0.3 * parts[1][i]))
            .collect();
        let candidate: Vec<f64> = parts[0].iter().map(|v| SCALE * v).collect();
        let error = frobenius(&update(a, a_shape, b, b_shape), &whole);
        let other = frobenius(&candidate, &whole);
        assert!(
            error < other,
            "{module}: svd error {error} vs another rank-4 {other}"
        );
    }
}

/// linear, magnitude_prune, ties and DARE follow PEFT's rules on the factors.
#[test]
fn factor_rules_follow_their_definitions() {
    let dir = tempfile::tempdir().unwrap();
    let first = reference("peft-bert");
    let second = derived_adapter(dir.path(), 0.8);
    let sources = [factors(&first), factors(&second)];

    // linear: A = Σ sign(wᵢsᵢ)√|wᵢsᵢ| Aᵢ, B = Σ √|wᵢsᵢ| Bᵢ (PEFT's rule on the factors).
    let out = dir.path().join("linear");
    combine(
        &[&first, &second],
        "0.6,-0.3",
        &["--combination", "linear"],
        &out,
    );
    let combined = factors(&out);
    for (module, (a, _, b, _)) in &combined {
        let (wa, wb): (Vec<f64>, Vec<f64>) = [0.6f64, -0.3]
            .iter()
            .map(|w| {
                let ws = w * SCALE;
                (ws.signum() * ws.abs().sqrt(), ws.abs().sqrt())
            })
            .unzip();
        let want_a: Vec<f64> = (0..a.len())
            .map(|i| wa[0] * sources[0][module].0[i] + wa[1] * sources[1][module].0[i])
            .collect();
        let want_b: Vec<f64> = (0..b.len())
            .map(|i| wb[0] * sources[0][module].2[i] + wb[1] * sources[1][module].2[i])
            .collect();
        assert!(max_abs(a, &want_a) <= 1e-6, "linear {module} A");
        assert!(max_abs(b, &want_b) <= 1e-6, "linear {module} B");
    }

    // magnitude_prune at density 0.5: each source factor keeps its ⌊n/2⌋ entries of largest
    // magnitude, then the factors are summed with linear's weights.
    let out = dir.path().join("pruned");
    combine(
        &[&first, &second],
        "0.6,0.4",
        &["--combination", "magnitude_prune", "--density", "0.5"],
        &out,
    );
    let prune = |values: &[f64]| -> Vec<f64> {
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by(|&x, &y| values[y].abs().total_cmp(&values[x].abs()));
        let mut kept = vec![0.0; values.len()];
        for &i in &order[..values.len() / 2] {
            kept[i] = values[i];
        }
        kept
    };
    for (module, (a, _, _, _)) in &factors(&out) {
        let weights: Vec<f64> = [0.6f64, 0.4].iter().map(|w| (w * SCALE).sqrt()).collect();
        let (p0, p1) = (prune(&sources[0][module].0), prune(&sources[1][module].0));
        let want: Vec<f64> = (0..a.len())
            .map(|i| weights[0] * p0[i] + weights[1] * p1[i])
            .collect();
        assert!(max_abs(a, &want) <= 1e-6, "magnitude_prune {module} A");
    }

    // ties with density 1 and weights of one sign keeps every entry whose signs agree.
    let ties = dir.path().join("ties");
    combine(
        &[&first, &second],
        "0.5,0.5",
        &["--combination", "ties", "--density", "1"],
        &ties,
    );
    // dare at density 1 is the weighted sum, as PEFT's rule says (no drop, no rescale).
    let dare = dir.path().join("dare");
    let linear = dir.path().join("linear2");
    combine(
        &[&first, &second],
        "0.5,0.5",
        &["--combination", "dare_linear", "--density", "1"],
        &dare,
    );
    combine(
        &[&first, &second],
        "0.5,0.5",
        &["--combination", "linear"],
        &linear,
    );
    assert_eq!(factors(&dare), factors(&linear), "dare_linear at density 1");
    // Seeded DARE is reproducible and the seed matters.
    let draw = |seed: &str, name: &str| {
        let out = dir.path().join(name);
        combine(
            &[&first, &second],
            "0.5,0.5",
            &[
                "--combination",
                "dare_ties",
                "--density",
                "0.5",
                "--seed",
                seed,
            ],
            &out,
        );
        factors(&out)
    };
    assert_eq!(draw("3", "d1"), draw("3", "d2"));
    assert_ne!(draw("3", "d3"), draw("4", "d4"));

    // The combined adapters load onto the model like any PEFT adapter.
    for adapter in [&out, &ties, &dare] {
        let patched = dir.path().join("patched.onnx");
        let (code, stdout, stderr) = run_graft(&[
            "apply",
            fixture_model("bert-legacy").to_str().unwrap(),
            "--from-peft",
            adapter.to_str().unwrap(),
            "-o",
            patched.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{stdout}{stderr}");
    }
}

#[test]
fn bad_combinations_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let first = reference("peft-bert");
    let out = dir.path().join("out");
    for (weights, flags, needle) in [
        ("0.5", vec!["--combination", "linear"], "2 adapters"),
        ("0.5,0.5", vec!["--combination", "mean"], "is not one of"),
        (
            "0.5,0.5",
            vec!["--combination", "ties", "--density", "1.5"],
            "density",
        ),
        ("0.5,0.5", vec!["--majority-sign", "most"], "majority-sign"),
    ] {
        let mut args = vec![
            "combine",
            first.to_str().unwrap(),
            first.to_str().unwrap(),
            "--weights",
            weights,
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend(flags);
        let (code, stdout, stderr) = run_graft(&args);
        assert_eq!(code, 2, "{stdout}{stderr}");
        assert!(stderr.contains(needle), "{needle:?} missing from {stderr}");
        assert!(
            !out.exists(),
            "a refused combination wrote {}",
            out.display()
        );
    }
}

/// Every combination PEFT's `add_weighted_adapter` computes without drawing at random, recorded
/// by models/record_lora_family.py (peft-combine-bert): graft's factors equal PEFT's (svd, whose
/// factors are unique only up to signs, by its update), every update `s · B · A` equals PEFT's
/// `get_delta_weight`, and the config carries PEFT's rank and alpha.
#[test]
fn combinations_match_peft_add_weighted_adapter() {
    let recording = reference("peft-combine-bert");
    let summary = read_json(&recording.join("recording.json"));
    let dir = tempfile::tempdir().unwrap();
    let combinations = summary["combinations"].as_object().unwrap();
    assert!(combinations.len() >= 8, "recorded combinations");
    for (name, recipe) in combinations {
        let sources: Vec<PathBuf> = recipe["adapters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| recording.join("sources").join(a.as_str().unwrap()))
            .collect();
        let weights: Vec<String> = recipe["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_f64().unwrap().to_string())
            .collect();
        let combination = recipe["combination_type"].as_str().unwrap();
        let mut flags = vec!["--combination".to_owned(), combination.to_owned()];
        if let Some(density) = recipe["density"].as_f64() {
            flags.extend(["--density".to_owned(), density.to_string()]);
        }
        if let Some(sign) = recipe["majority_sign_method"].as_str() {
            flags.extend(["--majority-sign".to_owned(), sign.to_owned()]);
        }
        if let Some(rank) = recipe["svd_rank"].as_u64() {
            flags.extend(["--svd-rank".to_owned(), rank.to_string()]);
        }
        let out = dir.path().join(name);
        let source_refs: Vec<&Path> = sources.iter().map(PathBuf::as_path).collect();
        let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
        combine(&source_refs, &weights.join(","), &flag_refs, &out);

        let config = read_json(&out.join("adapter_config.json"));
        assert_eq!(config["r"], recipe["r"], "{name}: r");
        assert_eq!(
            config["lora_alpha"], recipe["lora_alpha"],
            "{name}: lora_alpha"
        );
        let scale = recipe["lora_alpha"].as_f64().unwrap() / recipe["r"].as_f64().unwrap();
        let expected_dir = recording.join("combined").join(name);
        let (ours, theirs) = (factors(&out), factors(&expected_dir));
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{name}: modules"
        );
        let deltas: BTreeMap<String, graft::runtime::HostTensor> =
            graft::runtime::read_npz(&expected_dir.join("deltas.npz"))
                .unwrap()
                .into_iter()
                .collect();
        for (module, (a, a_shape, b, b_shape)) in &ours {
            let (pa, pa_shape, pb, pb_shape) = &theirs[module];
            assert_eq!(
                (a_shape, b_shape),
                (pa_shape, pb_shape),
                "{name} {module}: shapes"
            );
            if combination != "svd" {
                let diff = max_abs(a, pa).max(max_abs(b, pb));
                assert!(
                    diff <= 1e-5,
                    "{name} {module}: factors differ from PEFT's by {diff}"
                );
            }
            let delta: Vec<f64> = update(a, a_shape, b, b_shape)
                .iter()
                .map(|v| v * scale)
                .collect();
            let want = deltas[module].to_f64();
            let diff = max_abs(&delta, &want);
            assert!(
                diff <= 1e-5,
                "{name} {module}: update differs from PEFT's by {diff}"
            );
        }
    }
}
