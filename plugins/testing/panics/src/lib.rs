//! A plugin whose method panics: the SDK's boundary must turn the panic into an error reply.

use graft_plugin_sdk::{
    export_plugin, GraphView, Host, MethodConfig, MethodDescription, PatchReply, Plugin,
};

/// Panics in `patch`.
pub struct Panics;

impl Plugin for Panics {
    const NAME: &'static str = "panics";
    const VERSION: &'static str = "0.0.0";

    fn methods() -> Vec<MethodDescription> {
        vec![MethodDescription::new("panics", "always panics", vec![])]
    }

    fn patch(_: &Host<'_>, _: &str, _: &MethodConfig, _: &GraphView) -> Result<PatchReply, String> {
        panic!("deliberate panic inside the plugin")
    }
}

export_plugin!(Panics);
