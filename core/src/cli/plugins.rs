//! `graft plugins`: list the method plugins graft can find.

use std::path::PathBuf;

use graft::plugins::PluginRegistry;
use serde_json::json;

/// List plugins, their methods and each method's settings with defaults.
///
/// Plugins are found through --plugin, GRAFT_PLUGIN_PATH (files or folders separated by `:`), a
/// `plugins` folder beside the graft binary, and `libgraft_plugin_*` libraries beside it.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print JSON: `{"plugins":[{"path","name","version","methods":[{"name","summary","config":[{"key","kind","default","help"}]}]}],"rejected":["…"]}`.
    #[arg(long)]
    json: bool,
    /// Also load this plugin library (repeatable).
    #[arg(long = "plugin", value_name = "PATH")]
    plugins: Vec<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let registry = PluginRegistry::discover_with(
        &args.plugins,
        &graft::plugins::PluginIsolation::for_this_binary()?,
    )?;
    if args.json {
        let plugins: Vec<_> = registry
            .plugins
            .iter()
            .map(|p| {
                json!({
                    "path": p.path,
                    "name": p.description.name,
                    "version": p.description.version,
                    "methods": p.description.methods,
                })
            })
            .collect();
        let rejected: Vec<String> = registry.rejected.iter().map(|e| e.to_string()).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "plugins": plugins, "rejected": rejected }))?
        );
        return Ok(());
    }
    if registry.plugins.is_empty() {
        println!("no plugins found (use --plugin PATH or GRAFT_PLUGIN_PATH)");
    }
    for plugin in &registry.plugins {
        println!(
            "{} {}  {}",
            plugin.description.name,
            plugin.description.version,
            plugin.path.display()
        );
        for method in &plugin.description.methods {
            println!("  method {}: {}", method.name, method.summary);
            if let Some(import) = &method.peft_import {
                let flag = import
                    .flag
                    .as_ref()
                    .map(|f| format!(" with {f}"))
                    .unwrap_or_default();
                println!(
                    "    reads HF PEFT {}{flag} adapters (graft apply --from-peft)",
                    import.peft_type
                );
            }
            for key in &method.config {
                let default = if key.default.is_null() {
                    "(required)".to_owned()
                } else {
                    key.default.to_string()
                };
                println!(
                    "    {:<14} {:<8} default {:<16} {}",
                    key.key,
                    format!("{:?}", key.kind).to_lowercase(),
                    default,
                    key.help
                );
            }
        }
    }
    for rejected in &registry.rejected {
        eprintln!("warning: skipped {rejected}");
    }
    Ok(())
}
