//! Plugins out of process: each plugin library is loaded by a worker process (`graft
//! plugin-worker LIBRARY`, a hidden subcommand of the graft binary) and every call travels over
//! its pipes as the same bytes the C ABI carries, so that a plugin that crashes, aborts, hangs,
//! runs out of memory or ends the process is reported by name while graft carries on.
//!
//! Messages in both directions are one kind byte, a little-endian `u64` length and that many
//! bytes. The host sends `describe`, `patch` (the JSON request) or `step` (a frame) and then
//! answers the worker's tensor requests (a plugin asks for initializer bytes during a call)
//! until the worker sends the plugin's reply or error. The worker speaks the protocol on a copy
//! of its standard output and points its standard output at standard error, so that a plugin
//! printing cannot corrupt a message. The worker runs under a memory limit (`RLIMIT_AS`) and
//! each call under a time limit, after which the worker is killed.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use graft_plugin_sdk::{GraphView, PatchReply, PluginDescription, StepReply, StepRequest};
use graft_plugin_sdk::{PluginClient, TensorSource};
use serde::{Deserialize, Serialize};

/// The environment variable with the time limit of one plugin call, in seconds.
pub const TIMEOUT_VARIABLE: &str = "GRAFT_PLUGIN_TIMEOUT";
/// The environment variable with the memory limit of a plugin worker, in MiB.
pub const MEMORY_VARIABLE: &str = "GRAFT_PLUGIN_MEMORY_MB";
/// The environment variable that, set to `1`, loads plugins into the graft process instead
/// (trusted plugins only: a crash of one is then graft's).
pub const IN_PROCESS_VARIABLE: &str = "GRAFT_PLUGINS_IN_PROCESS";

const DESCRIBE: u8 = b'D';
const PATCH: u8 = b'P';
const STEP: u8 = b'S';
const TENSOR: u8 = b'T';
const TENSOR_REQUEST: u8 = b'R';
const OK: u8 = b'O';
const ERROR: u8 = b'E';

/// The limits a plugin worker runs under.
#[derive(Clone, Debug)]
pub struct ProcessLimits {
    /// The most one call may take before the worker is killed.
    pub timeout: Duration,
    /// The worker's address-space limit in bytes.
    pub memory_bytes: u64,
}

impl ProcessLimits {
    /// [`TIMEOUT_VARIABLE`] seconds (default 600) and [`MEMORY_VARIABLE`] MiB (default half
    /// the machine's memory, at least 2 GiB); fails naming a variable that is not a number.
    pub fn from_env() -> crate::Result<ProcessLimits> {
        let read = |name: &str| -> crate::Result<Option<u64>> {
            match std::env::var(name) {
                Ok(text) => text.trim().parse().map(Some).map_err(|_| {
                    crate::Error::Config(format!("{name}={text:?} is not a whole number"))
                }),
                Err(_) => Ok(None),
            }
        };
        // SAFETY: sysconf has no preconditions.
        let physical = unsafe {
            libc::sysconf(libc::_SC_PHYS_PAGES) as u64 * libc::sysconf(libc::_SC_PAGESIZE) as u64
        };
        Ok(ProcessLimits {
            timeout: Duration::from_secs(read(TIMEOUT_VARIABLE)?.unwrap_or(600).max(1)),
            memory_bytes: read(MEMORY_VARIABLE)?
                .map(|mib| mib << 20)
                .unwrap_or((physical / 2).max(2 << 30)),
        })
    }
}

/// The JSON of a patch request.
#[derive(Serialize, Deserialize)]
struct PatchRequest {
    method: String,
    config: serde_json::Value,
    graph: GraphView,
}

fn write_message(to: &mut impl Write, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut header = [0u8; 9];
    header[0] = kind;
    header[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    to.write_all(&header)?;
    to.write_all(payload)?;
    to.flush()
}

fn read_message(from: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut header = [0u8; 9];
    from.read_exact(&mut header)?;
    let length = u64::from_le_bytes(header[1..].try_into().expect("8 bytes"));
    let mut payload = Vec::new();
    from.take(length).read_to_end(&mut payload)?;
    if payload.len() as u64 != length {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok((header[0], payload))
}

/// A plugin library loaded by a worker process, started once and reused for every call.
pub struct PluginProcess {
    library: PathBuf,
    limits: ProcessLimits,
    worker: Mutex<Option<Worker>>,
}

struct Worker {
    child: Child,
    to_worker: ChildStdin,
    from_worker: DeadlineReader,
}

/// Reads a child's output, failing with `TimedOut` once the deadline has passed.
struct DeadlineReader {
    inner: ChildStdout,
    deadline: Instant,
}

impl Read for DeadlineReader {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            let mut poll = libc::pollfd {
                fd: self.inner.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let millis = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd for the duration of the call.
            let ready = unsafe { libc::poll(&mut poll, 1, millis.max(1)) };
            if ready < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
            if ready > 0 {
                return self.inner.read(buffer);
            }
        }
    }
}

impl PluginProcess {
    /// Starts a worker (`worker_exe plugin-worker LIBRARY`) for `library` and asks the plugin
    /// for its description. Fails with the reason (a crash, an early exit, a time-out, or
    /// what the plugin said) when it cannot describe itself.
    pub fn start(
        worker_exe: &Path,
        library: &Path,
        limits: &ProcessLimits,
    ) -> Result<(PluginProcess, PluginDescription), String> {
        let process = PluginProcess {
            library: library.to_path_buf(),
            limits: limits.clone(),
            worker: Mutex::new(None),
        };
        let mut command = Command::new(worker_exe);
        command
            .arg("plugin-worker")
            .arg(library)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let memory = limits.memory_bytes;
        // SAFETY: setrlimit is async-signal-safe, as pre_exec requires.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: memory,
                    rlim_max: memory,
                };
                libc::setrlimit(libc::RLIMIT_AS, &limit);
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| {
            format!(
                "cannot start the plugin worker {}: {e}",
                worker_exe.display()
            )
        })?;
        let worker = Worker {
            to_worker: child.stdin.take().expect("piped stdin"),
            from_worker: DeadlineReader {
                inner: child.stdout.take().expect("piped stdout"),
                deadline: Instant::now(),
            },
            child,
        };
        *process.worker.lock().expect("not poisoned") = Some(worker);
        let json = process.call(DESCRIBE, &[], &graft_plugin_sdk::NoTensors)?;
        let description = serde_json::from_slice(&json)
            .map_err(|e| format!("invalid description from the worker: {e}"))?;
        Ok((process, description))
    }

    /// Asks the plugin for a patch, lending `source`'s tensors on request.
    pub fn patch(
        &self,
        source: &dyn TensorSource,
        method: &str,
        config: &serde_json::Value,
        graph: &GraphView,
    ) -> Result<PatchReply, String> {
        let request = serde_json::to_vec(&PatchRequestRef {
            method,
            config,
            graph,
        })
        .map_err(|e| format!("cannot encode the request: {e}"))?;
        let frame = self.call(PATCH, &request, source)?;
        let reply = PatchReply::from_frame(&frame).map_err(|e| e.to_string())?;
        reply.check_payloads().map_err(|e| e.to_string())?;
        Ok(reply)
    }

    /// Runs the plugin's step hook.
    pub fn step(&self, request: &StepRequest) -> Result<StepReply, String> {
        let (json, blob) = request.encode().map_err(|e| e.to_string())?;
        let frame = graft_plugin_sdk::encode_frame(&json, &blob);
        let reply = self.call(STEP, &frame, &graft_plugin_sdk::NoTensors)?;
        StepReply::from_frame(&reply).map_err(|e| e.to_string())
    }

    /// Sends one request and serves the worker's tensor requests until it replies. A worker
    /// that dies, ends or overruns the time limit is killed and the reason comes back; later
    /// calls fail at once.
    fn call(&self, kind: u8, payload: &[u8], source: &dyn TensorSource) -> Result<Vec<u8>, String> {
        let mut slot = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        let Some(worker) = slot.as_mut() else {
            return Err("the plugin's worker process has already failed".into());
        };
        worker.from_worker.deadline = Instant::now() + self.limits.timeout;
        let outcome = exchange(worker, kind, payload, source);
        match outcome {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(message)) => Err(message),
            Err(error) => {
                let mut worker = slot.take().expect("present above");
                Err(self.failure(&mut worker, error))
            }
        }
    }

    /// Why the worker stopped answering, after making sure it is gone.
    fn failure(&self, worker: &mut Worker, error: std::io::Error) -> String {
        if error.kind() == std::io::ErrorKind::TimedOut {
            let _ = worker.child.kill();
            let _ = worker.child.wait();
            return format!(
                "the plugin did not reply within {} s ({TIMEOUT_VARIABLE}); its worker was killed",
                self.limits.timeout.as_secs()
            );
        }
        // The pipe closed: the worker is ending; give it a moment, then make sure.
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            match worker.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = worker.child.kill();
                    break worker.child.wait().ok();
                }
            }
        };
        let memory = format!(
            "(a plugin that runs out of memory ends so; the limit is {} MiB, {MEMORY_VARIABLE})",
            self.limits.memory_bytes >> 20
        );
        match status.and_then(|s| s.signal().map(|signal| (s, signal))) {
            Some((_, signal)) => format!(
                "the plugin crashed (signal {signal}, {}) {memory}",
                signal_name(signal)
            ),
            None => match status.and_then(|s| s.code()) {
                Some(code) => format!(
                    "the plugin ended its process (exit status {code}) before replying; a plugin \
                     must return from its call"
                ),
                None => format!("the plugin's worker stopped answering: {error}"),
            },
        }
    }

    /// The library this process serves.
    pub fn library(&self) -> &Path {
        &self.library
    }
}

impl Drop for PluginProcess {
    fn drop(&mut self) {
        if let Some(mut worker) = self.worker.get_mut().ok().and_then(Option::take) {
            // Closing its input ends a worker that is waiting for a request.
            drop(worker.to_worker);
            let _ = worker.child.wait();
        }
    }
}

#[derive(Serialize)]
struct PatchRequestRef<'a> {
    method: &'a str,
    config: &'a serde_json::Value,
    graph: &'a GraphView,
}

/// One request and its reply: `Err` for a broken pipe or a time-out, `Ok(Err)` for an error
/// the plugin returned.
fn exchange(
    worker: &mut Worker,
    kind: u8,
    payload: &[u8],
    source: &dyn TensorSource,
) -> std::io::Result<Result<Vec<u8>, String>> {
    write_message(&mut worker.to_worker, kind, payload)?;
    loop {
        let (kind, payload) = read_message(&mut worker.from_worker)?;
        match kind {
            TENSOR_REQUEST => {
                let name = String::from_utf8_lossy(&payload);
                let mut reply = Vec::new();
                match source.tensor_bytes(&name) {
                    Some(bytes) => {
                        reply.push(1);
                        reply.extend_from_slice(bytes);
                    }
                    None => reply.push(0),
                }
                write_message(&mut worker.to_worker, TENSOR, &reply)?;
            }
            OK => return Ok(Ok(payload)),
            ERROR => return Ok(Err(String::from_utf8_lossy(&payload).into_owned())),
            other => {
                return Err(std::io::Error::other(format!(
                    "unknown message kind {other} from the worker"
                )))
            }
        }
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGSEGV => "SIGSEGV, an invalid memory access",
        libc::SIGABRT => "SIGABRT, an abort",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE, an arithmetic fault",
        libc::SIGILL => "SIGILL",
        libc::SIGKILL => "SIGKILL",
        _ => "a signal",
    }
}

/// A tensor fetched from the host: its name and its bytes (`None`: the host has none).
type FetchedTensor = (String, Option<Box<[u8]>>);

/// Tensors fetched from the host on request, kept for the rest of the call.
struct RemoteTensors<'w> {
    to_host: RefCell<&'w mut std::fs::File>,
    from_host: RefCell<&'w mut std::io::Stdin>,
    fetched: RefCell<Vec<FetchedTensor>>,
}

impl TensorSource for RemoteTensors<'_> {
    fn tensor_bytes(&self, name: &str) -> Option<&[u8]> {
        let known = self.fetched.borrow().iter().position(|(n, _)| n == name);
        let index = match known {
            Some(index) => index,
            None => {
                let fetched = self.fetch(name).ok()?;
                let mut all = self.fetched.borrow_mut();
                all.push((name.to_owned(), fetched));
                all.len() - 1
            }
        };
        let all = self.fetched.borrow();
        let bytes = all[index].1.as_deref()?;
        // SAFETY: each boxed buffer is neither moved nor dropped while `self` lives (entries
        // are only ever appended), so the slice stays valid for the borrow of `self`.
        Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr(), bytes.len()) })
    }
}

impl RemoteTensors<'_> {
    fn fetch(&self, name: &str) -> std::io::Result<Option<Box<[u8]>>> {
        write_message(*self.to_host.borrow_mut(), TENSOR_REQUEST, name.as_bytes())?;
        let (kind, payload) = read_message(*self.from_host.borrow_mut())?;
        if kind != TENSOR || payload.is_empty() {
            return Err(std::io::Error::other("expected a tensor reply"));
        }
        Ok((payload[0] == 1).then(|| payload[1..].into()))
    }
}

/// The worker's side: loads `library` into this process and serves requests from standard
/// input until it closes. Returns the exit status: 0 once the host closes the input, 2 when
/// the library cannot be loaded or the host cannot be written to.
pub fn serve(library: &Path) -> i32 {
    // A plugin's arithmetic fault must end the worker by its signal, so that the host names
    // it; graft's own handler for the model's kernels does not apply here.
    // SAFETY: restoring a signal's default action before any other thread runs.
    unsafe {
        libc::signal(libc::SIGFPE, libc::SIG_DFL);
    }
    // SAFETY: dup and dup2 on the standard descriptors, before any other thread runs.
    let protocol_fd = unsafe {
        let fd = libc::dup(1);
        libc::dup2(2, 1);
        fd
    };
    if protocol_fd < 0 {
        eprintln!("error: plugin worker: cannot duplicate standard output");
        return 2;
    }
    // SAFETY: `protocol_fd` is a fresh descriptor this function owns.
    let mut to_host = unsafe { std::fs::File::from_raw_fd(protocol_fd) };
    let mut from_host = std::io::stdin();
    let client = match super::discovery::load_client(library) {
        Ok(client) => client,
        Err(e) => {
            let _ = read_message(&mut from_host);
            let _ = write_message(&mut to_host, ERROR, e.to_string().as_bytes());
            return 2;
        }
    };
    loop {
        let Ok((kind, payload)) = read_message(&mut from_host) else {
            return 0;
        };
        let reply = {
            let source = RemoteTensors {
                to_host: RefCell::new(&mut to_host),
                from_host: RefCell::new(&mut from_host),
                fetched: RefCell::new(Vec::new()),
            };
            handle(&client, kind, &payload, &source)
        };
        let written = match reply {
            Ok(bytes) => write_message(&mut to_host, OK, &bytes),
            Err(message) => write_message(&mut to_host, ERROR, message.as_bytes()),
        };
        if written.is_err() {
            return 2;
        }
    }
}

fn handle(
    client: &PluginClient<'static>,
    kind: u8,
    payload: &[u8],
    source: &dyn TensorSource,
) -> Result<Vec<u8>, String> {
    match kind {
        DESCRIBE => {
            let description = client.describe().map_err(|e| e.to_string())?;
            serde_json::to_vec(&description).map_err(|e| e.to_string())
        }
        PATCH => {
            let request: PatchRequest =
                serde_json::from_slice(payload).map_err(|e| format!("bad patch request: {e}"))?;
            let reply = client
                .patch(source, &request.method, &request.config, &request.graph)
                .map_err(|e| e.to_string())?;
            reply.to_frame().map_err(|e| e.to_string())
        }
        STEP => {
            let (json, blob) =
                graft_plugin_sdk::decode_frame(payload).map_err(|e| e.to_string())?;
            let json: serde_json::Value =
                serde_json::from_slice(json).map_err(|e| format!("bad step request: {e}"))?;
            let request = StepRequest::decode(&json, blob).map_err(|e| e.to_string())?;
            let reply = client.step(&request).map_err(|e| e.to_string())?;
            reply.to_frame().map_err(|e| e.to_string())
        }
        other => Err(format!("unknown request kind {other}")),
    }
}
