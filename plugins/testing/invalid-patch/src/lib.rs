//! A plugin returning a patch that reads a value nobody defines: the host must reject it and
//! leave the model untouched.

use graft_plugin_sdk::{
    export_plugin, GraphView, Host, MethodConfig, MethodDescription, NewNode, Patch, PatchReply,
    Plugin, Rewire,
};

/// Returns a dangling patch.
pub struct InvalidPatch;

impl Plugin for InvalidPatch {
    const NAME: &'static str = "invalid-patch";
    const VERSION: &'static str = "0.0.0";

    fn methods() -> Vec<MethodDescription> {
        vec![MethodDescription::new(
            "invalid-patch",
            "returns a dangling patch",
            vec![],
        )]
    }

    fn patch(
        _: &Host<'_>,
        _: &str,
        _: &MethodConfig,
        graph: &GraphView,
    ) -> Result<PatchReply, String> {
        let output = graph.outputs.first().cloned().unwrap_or_default();
        let patch = Patch {
            nodes: vec![NewNode {
                name: "dangling".into(),
                op_type: "Add".into(),
                domain: String::new(),
                inputs: vec![output.clone(), "no_such_value".into()],
                outputs: vec!["dangling_out".into()],
                attributes: Default::default(),
            }],
            rewires: vec![Rewire {
                value: output,
                replacement: "dangling_out".into(),
                keep: vec![],
                only: vec![],
            }],
            ..Patch::default()
        };
        Ok(PatchReply::new(patch))
    }
}

export_plugin!(InvalidPatch);
