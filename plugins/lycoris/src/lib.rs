//! The `lycoris` method plugin: weight updates built from products of small factors, as
//! LyCORIS introduced them and HF PEFT implements them for linear layers —
//! [`loha`] (Hadamard product of two low-rank matrices, Hyeon-Woo et al., 2022) and [`lokr`]
//! (Kronecker product, Yeh et al., 2024). Each grafts a [`delta branch`] `y + x · ΔWᵀ`: the
//! update is computed from its factors in the graph while training and folded into the weight
//! by `graft merge`. Both read and write HF PEFT's `LOHA` / `LOKR` adapter files.
//!
//! Factors are stored in PEFT's own shapes (PyTorch's `[out, in]` orientation), so adapter files
//! map one to one onto graft tensors.
//!
//! [`delta branch`]: graft_plugin_sdk::PatchBuilder::delta_branch

pub mod loha;
pub mod lokr;

use graft_plugin_sdk::serde_json;
use graft_plugin_sdk::{
    export_plugin, ConfigKey, GraphView, Host, MethodConfig, MethodDescription, PatchReply,
    PeftImport, Plugin, Site, SiteSelector,
};

/// LoHa and LoKr.
pub struct Lycoris;

impl Plugin for Lycoris {
    const NAME: &'static str = "lycoris";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn methods() -> Vec<MethodDescription> {
        vec![loha::description(), lokr::description()]
    }

    fn patch(
        host: &Host<'_>,
        method: &str,
        config: &MethodConfig,
        graph: &GraphView,
    ) -> Result<PatchReply, String> {
        match method {
            "loha" => loha::patch(host, config, graph),
            "lokr" => lokr::patch(host, config, graph),
            other => Err(format!("unknown method {other}")),
        }
    }
}

/// The config keys both methods share, with PEFT's defaults (`r = 8`, `alpha = 8`).
fn shared_keys() -> Vec<ConfigKey> {
    vec![
        ConfigKey::list("targets", &["q", "v"], "site kinds (q k v o qkv ffn_up ffn_gate ffn_down ffn_gate_up), all-linear, or label patterns"),
        ConfigKey::int("r", 8, "rank of the low-rank factors"),
        ConfigKey::float("alpha", 8.0, "scaling numerator: the update is scaled by alpha/r"),
        ConfigKey::map("rank_pattern", &[], "per-site rank overrides: label regex → r (first match wins)"),
        ConfigKey::map("alpha_pattern", &[], "per-site alpha overrides: label regex → alpha (first match wins)"),
        ConfigKey::float("rank_dropout", 0.0, "PEFT's dropout of whole update rows; only 0 is supported"),
        ConfigKey::float("module_dropout", 0.0, "PEFT's dropout of the whole update; only 0 is supported"),
        ConfigKey::int("seed", 0, "seed of the random factors' init"),
    ]
}

/// How the host reads PEFT files of a method with `peft_type` and these tensor suffixes.
fn peft_import(peft_type: &str, extra_fields: &[&str], suffixes: &[&str]) -> PeftImport {
    let fields = ["rank_dropout", "module_dropout"]
        .iter()
        .chain(extra_fields)
        .map(|f| (f.to_string(), f.to_string()))
        .collect();
    PeftImport {
        peft_type: peft_type.into(),
        rank_field: Some("r".into()),
        alpha_field: Some("alpha".into()),
        fields,
        inert_fields: vec![
            "init_weights".into(),
            "use_effective_conv2d".into(),
            "rank_dropout_scale".into(),
        ],
        tensor_suffixes: suffixes.iter().map(|s| s.to_string()).collect(),
        ..PeftImport::default()
    }
}

/// One selected site with its rank and scale `alpha / r`.
struct Target<'g> {
    site: &'g Site,
    r: usize,
    alpha: f64,
}

impl Target<'_> {
    fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }
}

/// The linear sites `targets` selects, with their ranks and alphas after the patterns; errors
/// when none is selected, on a rank of 0, and on the dropouts PEFT has but graft does not.
fn targets<'g>(
    method: &str,
    config: &MethodConfig,
    graph: &'g GraphView,
) -> Result<Vec<Target<'g>>, String> {
    for key in ["rank_dropout", "module_dropout"] {
        let p = config.get_f64(key)?;
        if p != 0.0 {
            return Err(format!(
                "{key} = {p}: {method} supports only 0 (PEFT's {key} has no counterpart in graft yet)"
            ));
        }
    }
    let selector: SiteSelector = config.get_sites("targets")?;
    let r = config.get_usize("r")?;
    let alpha = config.get_f64("alpha")?;
    let rank_pattern = config.get_patterns::<usize>("rank_pattern")?;
    let alpha_pattern = config.get_patterns::<f64>("alpha_pattern")?;
    let mut targets = Vec::new();
    for site_ref in selector.select(graph) {
        let site = site_ref.site;
        if !site.kind.is_linear() {
            continue;
        }
        let rank = rank_pattern.for_site(site).copied().unwrap_or(r);
        if rank == 0 {
            return Err(format!("rank 0 for site {}", site.display_name()));
        }
        targets.push(Target {
            site,
            r: rank,
            alpha: alpha_pattern.for_site(site).copied().unwrap_or(alpha),
        });
    }
    if targets.is_empty() {
        let mut kinds: Vec<&str> = graph
            .sites()
            .filter(|s| s.site.kind.is_linear())
            .map(|s| s.site.kind.name())
            .collect();
        kinds.sort_unstable();
        kinds.dedup();
        return Err(format!(
            "targets [{}] match no linear site of this model; it has: {}",
            config.get_list("targets")?.join(", "),
            kinds.join(", ")
        ));
    }
    Ok(targets)
}

/// The `adapter_config.json` fields every LyCORIS adapter shares, for these targets: base `r`
/// and `alpha` from the config, per-module `rank_pattern` / `alpha_pattern` where a module
/// differs, `target_modules` the modules' paths. `None` when a site has no module-path label.
fn peft_config(
    peft_type: &str,
    config: &MethodConfig,
    targets: &[Target<'_>],
) -> Result<Option<serde_json::Map<String, serde_json::Value>>, String> {
    use serde_json::{json, Map, Value};
    let r = config.get_usize("r")?;
    let alpha = config.get_f64("alpha")?;
    let mut modules = Vec::new();
    let (mut ranks, mut alphas) = (Map::new(), Map::new());
    for target in targets {
        let Some(label) = &target.site.label else {
            return Ok(None);
        };
        modules.push(label.clone());
        if target.r != r {
            ranks.insert(label.clone(), json!(target.r));
        }
        if target.alpha != alpha {
            alphas.insert(label.clone(), json!(target.alpha));
        }
    }
    modules.sort_unstable();
    let mut out = Map::new();
    for (key, value) in [
        ("peft_type", json!(peft_type)),
        ("task_type", Value::Null),
        ("base_model_name_or_path", Value::Null),
        ("inference_mode", json!(true)),
        ("r", json!(r)),
        ("alpha", json!(alpha)),
        ("rank_dropout", json!(0.0)),
        ("module_dropout", json!(0.0)),
        ("use_effective_conv2d", json!(false)),
        ("target_modules", json!(modules)),
        ("exclude_modules", Value::Null),
        ("init_weights", json!(true)),
        ("layers_to_transform", Value::Null),
        ("layers_pattern", Value::Null),
        ("rank_pattern", Value::Object(ranks)),
        ("alpha_pattern", Value::Object(alphas)),
        ("modules_to_save", Value::Null),
    ] {
        out.insert(key.into(), value);
    }
    Ok(Some(out))
}

export_plugin!(Lycoris);
