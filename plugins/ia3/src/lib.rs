//! The `ia3` method plugin: learned scaling vectors on keys, values and the FFN intermediate
//! activation (Liu et al., 2022, "(IA)³"), initialised to one.

use graft_plugin_sdk::{
    export_plugin, ConfigKey, ConfigKind, GraphView, Host, Init, MethodConfig, MethodDescription,
    PatchBuilder, PatchReply, Plugin, SiteKind,
};

/// IA³: `k ⊙ l_k`, `v ⊙ l_v` on the projections' outputs and `(h ⊙ l_ff)·W_down` on the FFN's
/// intermediate activation, as HF PEFT's `IA3Config` does with `feedforward_modules`.
pub struct Ia3;

impl Plugin for Ia3 {
    const NAME: &'static str = "ia3";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn methods() -> Vec<MethodDescription> {
        vec![MethodDescription::new(
            "ia3",
            "learned scaling vectors on k, v (outputs) and the FFN intermediate activation (input of ffn_down)",
            vec![ConfigKey::new(
                "targets",
                ConfigKind::List,
                "k,v,ffn_down".into(),
                "sites to scale: k, v, qkv (outputs scaled) and ffn_down (its input scaled)",
            )],
        )]
    }

    fn patch(
        _host: &Host<'_>,
        _method: &str,
        config: &MethodConfig,
        graph: &GraphView,
    ) -> Result<PatchReply, String> {
        let targets = config.get_list("targets")?;
        let mut kinds = Vec::new();
        for target in &targets {
            match SiteKind::from_name(target) {
                Some(kind @ (SiteKind::K | SiteKind::V | SiteKind::Qkv | SiteKind::FfnDown)) => {
                    kinds.push(kind)
                }
                _ => {
                    return Err(format!(
                        "targets: \"{target}\" is not one of: k, v, qkv, ffn_down"
                    ))
                }
            }
        }
        let mut builder = PatchBuilder::new(graph, "ia3");
        let mut n_sites = 0;
        for site_ref in graph.sites().filter(|s| kinds.contains(&s.site.kind)) {
            let site = site_ref.site;
            let result = if site.kind == SiteKind::FfnDown {
                builder.scale_input(site, Init::Ones)
            } else {
                builder.scale_output(site, Init::Ones)
            };
            result?;
            n_sites += 1;
        }
        if n_sites == 0 {
            let mut present: Vec<&str> = graph.sites().map(|s| s.site.kind.name()).collect();
            present.sort_unstable();
            present.dedup();
            return Err(format!(
                "targets [{}] match no site of this model; it has: {}",
                targets.join(", "),
                present.join(", ")
            ));
        }
        Ok(builder.finish())
    }
}

export_plugin!(Ia3);
