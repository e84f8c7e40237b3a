//! The `ia3` method plugin: learned scaling vectors on keys, values and the FFN intermediate
//! activation (Liu et al., 2022, "(IA)³"), initialised to one, configured like HF PEFT's
//! `IA3Config` and reading and writing its `IA3` adapter files.

use graft_plugin_sdk::{
    export_plugin, serde_json, ConfigKey, GraphView, Host, Init, MethodConfig, MethodDescription,
    PatchBuilder, PatchReply, PeftFiles, PeftImport, PeftTensor, Plugin,
};

/// The suffix of IA³'s tensors in PEFT's keys (`<module>.ia3_l`).
const PEFT_SUFFIX: &str = "ia3_l";

/// IA³: `y ⊙ l` on the output of each targeted linear site (keys and values by default, bias
/// included) and `(x ⊙ l)·W` on the input of each feedforward site (the FFN down projection by
/// default), as HF PEFT's `IA3Config` does with `target_modules` and `feedforward_modules`.
pub struct Ia3;

impl Plugin for Ia3 {
    const NAME: &'static str = "ia3";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn methods() -> Vec<MethodDescription> {
        vec![MethodDescription::new(
            "ia3",
            "learned scaling vectors on k, v (outputs) and the FFN intermediate activation (input of ffn_down)",
            vec![
                ConfigKey::list(
                    "targets",
                    &["k", "v", "ffn_down"],
                    "linear sites to scale: site kinds (q k v o qkv ffn_up ffn_gate ffn_down ffn_gate_up), all-linear, or label patterns",
                ),
                ConfigKey::list(
                    "feedforward",
                    &["ffn_down"],
                    "the targets whose input is scaled instead of their output (PEFT's feedforward_modules)",
                ),
            ],
        )
        .with_peft_import(PeftImport {
            peft_type: "IA3".into(),
            module_fields: vec![("feedforward_modules".into(), "feedforward".into())],
            inert_fields: vec!["init_ia3_weights".into(), "fan_in_fan_out".into()],
            tensor_suffixes: vec![PEFT_SUFFIX.into()],
            ..PeftImport::default()
        })]
    }

    fn patch(
        _host: &Host<'_>,
        _method: &str,
        config: &MethodConfig,
        graph: &GraphView,
    ) -> Result<PatchReply, String> {
        let targets = config.get_sites("targets")?;
        let feedforward = config.get_sites("feedforward")?;
        let mut builder = PatchBuilder::new(graph, "ia3");
        let mut tensors = Vec::new();
        let (mut modules, mut feedforward_modules) = (Vec::new(), Vec::new());
        let mut labelled = true;
        for site_ref in targets.select(graph) {
            let site = site_ref.site;
            if !site.kind.is_linear() {
                continue;
            }
            let scales_input = feedforward.matches(site);
            let (names, peft_shape) = if scales_input {
                (
                    builder.scale_input(site, Init::Ones)?,
                    vec![1, site.in_features],
                )
            } else {
                (
                    builder.scale_output(site, Init::Ones)?,
                    vec![site.out_features, 1],
                )
            };
            match &site.label {
                Some(label) => {
                    modules.push(label.clone());
                    if scales_input {
                        feedforward_modules.push(label.clone());
                    }
                    tensors.push(PeftTensor {
                        key: format!("{label}.{PEFT_SUFFIX}"),
                        tensor: names.vector,
                        transpose: false,
                        shape: peft_shape,
                        rank_axis: None,
                    });
                }
                None => labelled = false,
            }
        }
        if builder.patch().folds.is_empty() {
            let mut present: Vec<&str> = graph
                .sites()
                .filter(|s| s.site.kind.is_linear())
                .map(|s| s.site.kind.name())
                .collect();
            present.sort_unstable();
            present.dedup();
            return Err(format!(
                "targets [{}] match no linear site of this model; it has: {}",
                config.get_list("targets")?.join(", "),
                present.join(", ")
            ));
        }
        let mut reply = builder.finish();
        if labelled {
            modules.sort_unstable();
            feedforward_modules.sort_unstable();
            reply.patch.training.peft = Some(PeftFiles {
                config: serde_json::json!({
                    "peft_type": "IA3",
                    "task_type": null,
                    "base_model_name_or_path": null,
                    "inference_mode": true,
                    "target_modules": modules,
                    "exclude_modules": null,
                    "feedforward_modules": feedforward_modules,
                    "fan_in_fan_out": false,
                    "modules_to_save": null,
                    "init_ia3_weights": true,
                }),
                tensors,
                ..PeftFiles::default()
            });
        }
        Ok(reply)
    }
}

export_plugin!(Ia3);
