//! Finding and loading plugin libraries: `--plugin PATH`, `$GRAFT_PLUGIN_PATH`, the `plugins`
//! folder beside the `graft` binary, and `libgraft_plugin_*` libraries beside the binary itself
//! (a cargo build tree).

use std::path::{Path, PathBuf};

use graft_plugin_sdk::abi::GraftPluginTable;
use graft_plugin_sdk::{
    GraphView, MethodDescription, PatchReply, PluginClient, PluginDescription, StepReply,
    StepRequest, TensorSource,
};

use super::worker::{PluginProcess, ProcessLimits};

use crate::{Error, Result};

/// How plugin libraries are run.
#[derive(Clone, Debug)]
pub enum PluginIsolation {
    /// Loaded into this process: fastest, but a plugin that crashes, hangs or exits takes
    /// graft with it. For trusted plugins, and for programs that are not the graft binary.
    InProcess,
    /// Each library loaded by a worker process of `worker` (the graft binary, run as
    /// `graft plugin-worker LIBRARY`) under `limits` (see [`super::worker`]).
    Process {
        /// The graft binary.
        worker: PathBuf,
        /// The time and memory limits.
        limits: ProcessLimits,
    },
}

impl PluginIsolation {
    /// What the `graft` binary uses: worker processes of the running binary under
    /// [`ProcessLimits::from_env`], or in-process loading when `GRAFT_PLUGINS_IN_PROCESS=1`.
    pub fn for_this_binary() -> Result<PluginIsolation> {
        if std::env::var(super::worker::IN_PROCESS_VARIABLE).is_ok_and(|v| v == "1") {
            return Ok(PluginIsolation::InProcess);
        }
        let worker = std::env::current_exe()
            .map_err(|e| Error::Config(format!("cannot find the graft binary: {e}")))?;
        Ok(PluginIsolation::Process {
            worker,
            limits: ProcessLimits::from_env()?,
        })
    }
}

/// Where a plugin's calls go.
enum Backend {
    InProcess(PluginClient<'static>),
    Process(PluginProcess),
}

/// A loaded plugin. An in-process library stays loaded for the life of the process.
pub struct LoadedPlugin {
    /// Where the library was loaded from.
    pub path: PathBuf,
    /// What the plugin says about itself.
    pub description: PluginDescription,
    backend: Backend,
}

impl LoadedPlugin {
    /// `name (path)`, for messages.
    pub fn display_name(&self) -> String {
        format!("{} ({})", self.description.name, self.path.display())
    }

    /// Loads the plugin library at `path` into this process, checks its ABI table and asks
    /// for its description.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, &PluginIsolation::InProcess)
    }

    /// Loads the plugin library at `path` as `isolation` says and asks for its description.
    /// Errors name the library.
    pub fn load_with(path: &Path, isolation: &PluginIsolation) -> Result<Self> {
        let fail = |reason: String| Error::Plugin {
            plugin: path.display().to_string(),
            reason,
        };
        let (backend, description) = match isolation {
            PluginIsolation::InProcess => {
                let client = load_client(path)?;
                let description = client
                    .describe()
                    .map_err(|e| fail(format!("describe failed: {e}")))?;
                (Backend::InProcess(client), description)
            }
            PluginIsolation::Process { worker, limits } => {
                let (process, description) =
                    PluginProcess::start(worker, path, limits).map_err(fail)?;
                (Backend::Process(process), description)
            }
        };
        Ok(LoadedPlugin {
            path: path.to_path_buf(),
            description,
            backend,
        })
    }

    /// Asks the plugin for a patch for `method` with `config` on `graph`, lending `source`'s
    /// tensors.
    pub fn patch(
        &self,
        source: &dyn TensorSource,
        method: &str,
        config: &serde_json::Value,
        graph: &GraphView,
    ) -> std::result::Result<PatchReply, String> {
        match &self.backend {
            Backend::InProcess(client) => client
                .patch(source, method, config, graph)
                .map_err(|e| e.to_string()),
            Backend::Process(process) => process.patch(source, method, config, graph),
        }
    }

    /// Runs the plugin's step hook.
    pub fn step(&self, request: &StepRequest) -> std::result::Result<StepReply, String> {
        match &self.backend {
            Backend::InProcess(client) => client.step(request).map_err(|e| e.to_string()),
            Backend::Process(process) => process.step(request),
        }
    }
}

/// Loads the library at `path` into this process and validates its ABI table; the library
/// is never unloaded.
pub(super) fn load_client(path: &Path) -> Result<PluginClient<'static>> {
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
    Ok(client)
}

/// Every plugin graft could find, plus the ones it found but had to reject.
#[derive(Default)]
pub struct PluginRegistry {
    /// Plugins that loaded, in discovery order.
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
        Self::discover_with(explicit, &PluginIsolation::InProcess)
    }

    /// [`PluginRegistry::discover`], each library run as `isolation` says: with worker
    /// processes, a library that crashes, hangs or exits while describing itself is skipped
    /// (or, named explicitly, an error) and the others still load.
    pub fn discover_with(explicit: &[PathBuf], isolation: &PluginIsolation) -> Result<Self> {
        let mut registry = PluginRegistry::default();
        for path in explicit {
            let plugin = LoadedPlugin::load_with(path, isolation)?;
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
            match LoadedPlugin::load_with(&path, isolation) {
                Ok(plugin) => registry.add(plugin),
                Err(error) => registry.rejected.push(error),
            }
        }
        Ok(registry)
    }

    fn add(&mut self, plugin: LoadedPlugin) {
        self.plugins.push(plugin);
    }

    /// The plugin and method description for `method`; the error lists the methods available,
    /// or names every plugin when more than one offers `method` (none is picked silently).
    pub fn find_method(&self, method: &str) -> Result<(&LoadedPlugin, &MethodDescription)> {
        let offering: Vec<(&LoadedPlugin, &MethodDescription)> = self
            .plugins
            .iter()
            .filter_map(|plugin| Some((plugin, plugin.description.method(method)?)))
            .collect();
        match offering.as_slice() {
            [found] => return Ok(*found),
            [] => {}
            several => {
                let names: Vec<String> = several.iter().map(|(p, _)| p.display_name()).collect();
                return Err(Error::Config(format!(
                    "method {method:?} is offered by {} plugins: {}; keep one of them on the \
                     plugin path",
                    several.len(),
                    names.join(", ")
                )));
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

/// Whether `a` and `b` name one file (the same device and inode: hard links included, as a
/// cargo build tree links each library into two folders).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
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
