//! Finding and loading plugin libraries: `--plugin PATH`, `$GRAFT_PLUGIN_PATH`, the `plugins`
//! folder beside the `graft` binary, and `libgraft_plugin_*` libraries beside the binary itself
//! (a cargo build tree).

use std::path::{Path, PathBuf};

use graft_plugin_sdk::abi::GraftPluginTable;
use graft_plugin_sdk::{MethodDescription, PluginClient, PluginDescription};

use crate::{Error, Result};

/// A loaded plugin. Its library stays loaded for the life of the process.
pub struct LoadedPlugin {
    /// Where the library was loaded from.
    pub path: PathBuf,
    /// What the plugin says about itself.
    pub description: PluginDescription,
    client: PluginClient<'static>,
}

impl LoadedPlugin {
    /// The client that calls into the library.
    pub fn client(&self) -> &PluginClient<'static> {
        &self.client
    }

    /// `name (path)`, for messages.
    pub fn display_name(&self) -> String {
        format!("{} ({})", self.description.name, self.path.display())
    }

    /// Loads the plugin library at `path`, checks its ABI table and asks for its description.
    pub fn load(path: &Path) -> Result<Self> {
        let fail = |reason: String| Error::Plugin {
            plugin: path.display().to_string(),
            reason,
        };
        // SAFETY: loading a library runs its initialisers; graft only loads files the user named
        // or placed in a plugin folder, which is the trust model of every plugin system.
        let library = unsafe { libloading::Library::new(path) }
            .map_err(|e| fail(format!("cannot load the library: {e}")))?;
        let entry: libloading::Symbol<unsafe extern "C" fn() -> *const GraftPluginTable> =
            unsafe { library.get(graft_plugin_sdk::abi::ENTRY_SYMBOL) }.map_err(|e| {
                fail(format!(
                    "not a graft plugin (no graft_plugin_entry symbol): {e}"
                ))
            })?;
        // SAFETY: the symbol has the ABI's signature; the table it returns lives as long as the
        // library, which is never unloaded (forgotten below).
        let table = unsafe { entry() };
        let client = unsafe { PluginClient::from_raw(table) }.map_err(|e| fail(e.to_string()))?;
        std::mem::forget(library);
        let description = client
            .describe()
            .map_err(|e| fail(format!("describe failed: {e}")))?;
        Ok(LoadedPlugin {
            path: path.to_path_buf(),
            description,
            client,
        })
    }
}

/// Every plugin graft could find, plus the ones it found but had to reject.
#[derive(Default)]
pub struct PluginRegistry {
    /// Plugins that loaded, in discovery order (earlier ones win on a method-name clash).
    pub plugins: Vec<LoadedPlugin>,
    /// Libraries found in plugin folders that could not be loaded, with the reason.
    pub rejected: Vec<Error>,
}

impl PluginRegistry {
    /// Loads the plugins named explicitly (a failure is an error) and those found in
    /// `$GRAFT_PLUGIN_PATH` (files or folders, separated by `:`), in a `plugins` folder beside
    /// the running binary, and `libgraft_plugin_*` libraries beside the binary (a failure there
    /// is recorded in [`PluginRegistry::rejected`] and skipped).
    pub fn discover(explicit: &[PathBuf]) -> Result<Self> {
        let mut registry = PluginRegistry::default();
        for path in explicit {
            let plugin = LoadedPlugin::load(path)?;
            registry.add(plugin);
        }
        let mut candidates = Vec::new();
        if let Some(paths) = std::env::var_os("GRAFT_PLUGIN_PATH") {
            for entry in std::env::split_paths(&paths) {
                if entry.is_dir() {
                    candidates.extend(libraries_in(&entry, |_| true));
                } else if entry.is_file() {
                    candidates.push(entry);
                }
            }
        }
        if let Some(exe_dir) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
        {
            candidates.extend(libraries_in(&exe_dir.join("plugins"), |_| true));
            candidates.extend(libraries_in(&exe_dir, |name| {
                name.starts_with("libgraft_plugin_") || name.starts_with("graft_plugin_")
            }));
        }
        for path in candidates {
            if registry.plugins.iter().any(|p| same_file(&p.path, &path)) {
                continue;
            }
            match LoadedPlugin::load(&path) {
                Ok(plugin) => registry.add(plugin),
                Err(error) => registry.rejected.push(error),
            }
        }
        Ok(registry)
    }

    fn add(&mut self, plugin: LoadedPlugin) {
        self.plugins.push(plugin);
    }

    /// The plugin and method description for `method`; the error lists the methods available.
    pub fn find_method(&self, method: &str) -> Result<(&LoadedPlugin, &MethodDescription)> {
        for plugin in &self.plugins {
            if let Some(description) = plugin.description.method(method) {
                return Ok((plugin, description));
            }
        }
        let mut available: Vec<&str> = self
            .plugins
            .iter()
            .flat_map(|p| p.description.methods.iter().map(|m| m.name.as_str()))
            .collect();
        available.sort_unstable();
        available.dedup();
        let mut message = if available.is_empty() {
            format!("unknown method {method:?}: no plugins were found (use --plugin PATH or GRAFT_PLUGIN_PATH)")
        } else {
            format!(
                "unknown method {method:?}; available methods: {}",
                available.join(", ")
            )
        };
        for rejected in &self.rejected {
            message.push_str(&format!("\n  skipped {rejected}"));
        }
        Err(Error::Config(message))
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn libraries_in(dir: &Path, wanted: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let is_library = [".so", ".dylib", ".dll"]
                .iter()
                .any(|ext| name.ends_with(ext));
            is_library && wanted(name)
        })
        .collect();
    found.sort();
    found
}
