//! The `lora` method plugin: low-rank branches `y + (α/r)·(x·A)·B` on selected linear sites
//! (Hu et al., 2021), configured like HF PEFT's `LoraConfig`; [`dora`] (LoRA with a learned
//! magnitude per output, Liu et al., 2024; PEFT's `use_dora`); and [`qlora`] (LoRA on NF4
//! base weights, Dettmers et al., 2023).

pub mod dora;
pub mod qlora;

use graft_plugin_sdk::{
    export_plugin, ConfigKey, ConfigKind, GraphView, Host, Init, MethodConfig, MethodDescription,
    PatchBuilder, PatchReply, Plugin, Site, SiteSelector,
};

/// LoRA, with HF PEFT's defaults: A Kaiming-uniform (a = √5), B zero, scale α/r (α/√r with
/// rsLoRA).
pub struct Lora;

impl Plugin for Lora {
    const NAME: &'static str = "lora";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn methods() -> Vec<MethodDescription> {
        vec![
            MethodDescription::new(
                "lora",
                "low-rank adaptation: y + (alpha/r)·(x·A)·B on the selected linear sites",
                lora_keys(),
            ),
            dora::description(),
            qlora::description(),
        ]
    }

    fn patch(
        host: &Host<'_>,
        method: &str,
        config: &MethodConfig,
        graph: &GraphView,
    ) -> Result<PatchReply, String> {
        match method {
            "dora" => return dora::patch(host, config, graph),
            "qlora" => return qlora::patch(host, config, graph),
            _ => {}
        }
        // Some(0.0) adds no dropout node; passing every value lets the SDK refuse those
        // outside [0, 1).
        let dropout = Some(config.get_f32("dropout")?);
        let gaussian = match config.get_string("init")?.as_str() {
            "kaiming" | "default" | "true" => false,
            "gaussian" => true,
            other => return Err(format!("init \"{other}\" is not one of: kaiming, gaussian")),
        };
        let seed = config.get_usize("seed")? as u64;
        let mut builder = PatchBuilder::new(graph, "lora").with_seed(seed);
        for target in selected_sites(config, graph)? {
            let seed = builder.next_seed();
            let init_a = if gaussian {
                Init::Normal {
                    mean: 0.0,
                    std: 1.0 / target.r as f64,
                    seed,
                }
            } else {
                Init::linear_default(target.site.in_features, seed)
            };
            builder.low_rank_branch(
                target.site,
                target.r,
                target.scale as f32,
                init_a,
                Init::Zeros,
                dropout,
            )?;
        }
        Ok(builder.finish())
    }
}

/// The config keys of `lora`, with HF PEFT's defaults where PEFT has the setting.
fn lora_keys() -> Vec<ConfigKey> {
    vec![
        ConfigKey::new("targets", ConfigKind::List, "q,v".into(), "site kinds (q k v o qkv ffn_up ffn_gate ffn_down ffn_gate_up), all-linear, or label patterns"),
        ConfigKey::string("target_regex", "", "regular expression on site labels, added to targets"),
        ConfigKey::new("layers", ConfigKind::List, "".into(), "layer indices to transform (empty: all)"),
        ConfigKey::int("r", 8, "rank"),
        ConfigKey::float("alpha", 8.0, "scaling numerator: scale = alpha/r (alpha/sqrt(r) with rslora)"),
        ConfigKey::bool("rslora", false, "rank-stabilised scaling alpha/sqrt(r)"),
        ConfigKey::float("dropout", 0.0, "dropout on the branch input, active in training graphs only"),
        ConfigKey::map("rank_pattern", &[], "per-site rank overrides: label regex → r"),
        ConfigKey::map("alpha_pattern", &[], "per-site alpha overrides: label regex → alpha"),
        ConfigKey::string("init", "kaiming", "A's init: kaiming (HF PEFT's default) or gaussian (std 1/r); B starts at zero"),
        ConfigKey::int("seed", 0, "seed of A's random init"),
    ]
}

/// A selected linear site with its rank and branch scale.
pub(crate) struct Target<'g> {
    pub(crate) site: &'g Site,
    pub(crate) r: usize,
    /// `alpha / r`, or `alpha / √r` with rsLoRA.
    pub(crate) scale: f64,
}

/// The linear sites `targets`, `target_regex` and `layers` select, in graph order, with their
/// ranks and scales after `rank_pattern` and `alpha_pattern`. Errors name the valid choices when
/// nothing is selected.
pub(crate) fn selected_sites<'g>(
    config: &MethodConfig,
    graph: &'g GraphView,
) -> Result<Vec<Target<'g>>, String> {
    let mut targets = config.get_list("targets")?;
    let regex = config.get_string("target_regex")?;
    if !regex.is_empty() {
        targets.push(regex);
    }
    let selector = SiteSelector::parse(&targets).map_err(|e| format!("targets {e}"))?;
    let layers = parse_layers(&config.get_list("layers")?)?;
    let r = config.get_usize("r")?;
    let alpha = config.get_f64("alpha")?;
    let rslora = config.get_bool("rslora")?;
    let rank_pattern = config.get_patterns::<usize>("rank_pattern")?;
    let alpha_pattern = config.get_patterns::<f64>("alpha_pattern")?;
    let matched: Vec<_> = selector
        .select(graph)
        .into_iter()
        .filter(|s| s.site.kind.is_linear())
        .collect();
    if matched.is_empty() {
        return Err(no_match_message(graph, &targets));
    }
    let selected: Vec<_> = matched
        .iter()
        .filter(|s| layers.as_ref().is_none_or(|l| l.contains(&s.layer.index)))
        .collect();
    if selected.is_empty() {
        let mut present: Vec<usize> = matched.iter().map(|s| s.layer.index).collect();
        present.sort_unstable();
        present.dedup();
        return Err(format!(
            "layers {:?} select none of the layers that targets [{}] match (layers {present:?})",
            config.get_list("layers")?,
            targets.join(", ")
        ));
    }
    Ok(selected
        .into_iter()
        .map(|site_ref| {
            let site = site_ref.site;
            let rank = rank_pattern.for_site(site).copied().unwrap_or(r);
            let site_alpha = alpha_pattern.for_site(site).copied().unwrap_or(alpha);
            let scale = if rslora {
                site_alpha / (rank as f64).sqrt()
            } else {
                site_alpha / rank as f64
            };
            Target {
                site,
                r: rank,
                scale,
            }
        })
        .collect())
}

/// Parses `layers` entries (`"0"`, `"2-5"`); an empty list means every layer.
fn parse_layers(entries: &[String]) -> Result<Option<Vec<usize>>, String> {
    if entries.is_empty() {
        return Ok(None);
    }
    let mut layers = Vec::new();
    for entry in entries {
        let parse = |s: &str| {
            s.trim().parse::<usize>().map_err(|_| {
                format!("layers: \"{entry}\" is not a layer index or a range like 2-5")
            })
        };
        match entry.split_once('-') {
            Some((start, end)) => layers.extend(parse(start)?..=parse(end)?),
            None => layers.push(parse(entry)?),
        }
    }
    Ok(Some(layers))
}

/// The message for targets that select nothing: the site kinds and a few labels this model has.
fn no_match_message(graph: &GraphView, targets: &[String]) -> String {
    let mut kinds: Vec<&str> = graph
        .sites()
        .filter(|s| s.site.kind.is_linear())
        .map(|s| s.site.kind.name())
        .collect();
    kinds.sort_unstable();
    kinds.dedup();
    let labels: Vec<&str> = graph
        .sites()
        .filter_map(|s| s.site.label.as_deref())
        .take(4)
        .collect();
    format!(
        "targets [{}] match no site of this model; valid choices: {}, all-linear, or a regex on labels such as {}",
        targets.join(", "),
        kinds.join(", "),
        labels.join(", ")
    )
}

export_plugin!(Lora);
