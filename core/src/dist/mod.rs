//! Data parallelism on PyTorch's own distributed engine (c10d): the world a process belongs to
//! (from `sipt run --nproc-per-node`, torchrun's or Slurm's environment), and the collectives
//! the training loops need, over a Gloo (CPU) or NCCL (CUDA) process group reached through the
//! C++ shim `cpp/distributed.cpp`.
//!
//! A world of one process has no group: every collective is then the identity, so the loops
//! are written once. Every collective waits at most `distributed.timeout_s`; when one fails,
//! the error names the rank that reported a failure first (ranks post their fatal errors in the
//! rendezvous store before they exit) or says that a peer went away.

pub mod launch;

use anyhow::{anyhow, bail, Context, Result};
use std::ffi::{c_char, c_void, CStr, CString};
use std::time::Duration;
use tch::{Device, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn sipt_dist_available() -> i32;
    fn sipt_dist_has_nccl() -> i32;
    fn sipt_dist_init(
        host: *const c_char,
        port: i32,
        rank: i32,
        size: i32,
        timeout_ms: i64,
        backend: *const c_char,
        serve: i32,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut c_void;
    fn sipt_dist_free(group: *mut c_void);
    fn sipt_dist_close_backend(group: *mut c_void);
    fn sipt_dist_all_reduce_sum(
        group: *mut c_void,
        tensor: *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn sipt_dist_all_gather(
        group: *mut c_void,
        input: *const C_tensor,
        output: *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn sipt_dist_broadcast(
        group: *mut c_void,
        tensor: *mut C_tensor,
        root: i32,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn sipt_dist_store_set(
        group: *mut c_void,
        key: *const c_char,
        value: *const u8,
        len: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn sipt_dist_store_check(
        group: *mut c_void,
        key: *const c_char,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn sipt_dist_store_get(
        group: *mut c_void,
        key: *const c_char,
        out: *mut u8,
        cap: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> i64;
}

/// Whether this build has c10d process groups (Gloo's headers were there when it was built).
pub fn available() -> bool {
    // SAFETY: a plain function without arguments.
    unsafe { sipt_dist_available() == 1 }
}

/// A collective failed because another rank failed or went away: this rank's error is a
/// consequence. `sipt` exits with [`PEER_FAILURE_EXIT`] for it, so that a launcher can name the
/// rank that failed first.
#[derive(Debug)]
pub struct PeerFailure(pub String);

impl std::fmt::Display for PeerFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PeerFailure {}

/// The exit status of a rank that stopped because another one failed.
pub const PEER_FAILURE_EXIT: u8 = 75;

/// Whether this build has c10d's NCCL backend (for CUDA tensors).
pub fn has_nccl() -> bool {
    // SAFETY: a plain function without arguments.
    unsafe { sipt_dist_has_nccl() == 1 }
}

/// Where this process stands among the ranks of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
    pub local_size: usize,
    /// The rendezvous: rank 0 serves c10d's TCPStore here (or torchrun's agent does, when it
    /// says so with `TORCHELASTIC_USE_AGENT_STORE=True`).
    pub master_addr: String,
    pub master_port: u16,
    pub agent_store: bool,
}

impl World {
    /// One process alone.
    pub fn single() -> World {
        World {
            rank: 0,
            size: 1,
            local_rank: 0,
            local_size: 1,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
            agent_store: false,
        }
    }

    /// The world this process's environment describes: torchrun's contract (`RANK`,
    /// `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, which
    /// `--nproc-per-node` sets too), else a Slurm job step of several tasks (`SLURM_PROCID`,
    /// `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`, the first host of `SLURM_STEP_NODELIST`), else a
    /// single process.
    pub fn from_env() -> Result<World> {
        World::from_vars(|k| std::env::var(k).ok())
    }

    /// [`World::from_env`] over any source of variables.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<World> {
        let number = |key: &str| -> Result<Option<usize>> {
            match var(key) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    anyhow!("environment variable {key} = {v:?}: expected a whole number")
                }),
            }
        };
        if let Some(size) = number("WORLD_SIZE")? {
            let rank =
                number("RANK")?.ok_or_else(|| anyhow!("WORLD_SIZE is set but RANK is not"))?;
            let world = World {
                rank,
                size,
                local_rank: number("LOCAL_RANK")?.unwrap_or(rank),
                local_size: number("LOCAL_WORLD_SIZE")?.unwrap_or(size),
                master_addr: var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
                master_port: port(var("MASTER_PORT"), 29500)?,
                agent_store: var("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True"),
            };
            return world.checked();
        }
        let step_tasks = number("SLURM_STEP_NUM_TASKS")?;
        if let (Some(size), Some(rank)) = (step_tasks, number("SLURM_PROCID")?) {
            if size > 1 {
                let nodes = var("SLURM_STEP_NODELIST")
                    .or_else(|| var("SLURM_JOB_NODELIST"))
                    .ok_or_else(|| {
                        anyhow!("a Slurm step of {size} tasks without SLURM_STEP_NODELIST")
                    })?;
                // A port every task of the job computes alike, away from the usual ones.
                let job = number("SLURM_JOB_ID")?.unwrap_or(0);
                let world = World {
                    rank,
                    size,
                    local_rank: number("SLURM_LOCALID")?.unwrap_or(0),
                    local_size: var("SLURM_STEP_TASKS_PER_NODE")
                        .and_then(|t| first_count(&t))
                        .unwrap_or(size),
                    master_addr: var("MASTER_ADDR").unwrap_or(first_host(&nodes)?),
                    master_port: port(var("MASTER_PORT"), 20000 + (job % 20000) as u16)?,
                    agent_store: false,
                };
                return world.checked();
            }
        }
        Ok(World::single())
    }

    fn checked(self) -> Result<World> {
        if self.size == 0 || self.rank >= self.size {
            bail!(
                "rank {} of a world of {}: expected 0 <= RANK < WORLD_SIZE",
                self.rank,
                self.size
            );
        }
        if self.local_size == 0 || self.local_rank >= self.local_size {
            bail!(
                "local rank {} of {}: expected 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE",
                self.local_rank,
                self.local_size
            );
        }
        Ok(self)
    }

    pub fn is_single(&self) -> bool {
        self.size == 1
    }
}

fn port(value: Option<String>, default: u16) -> Result<u16> {
    match value {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| anyhow!("MASTER_PORT = {v:?}: expected a port number")),
    }
}

/// The task count of the first node in Slurm's `2(x3),1` notation.
fn first_count(tasks: &str) -> Option<usize> {
    tasks.split([',', '(']).next()?.trim().parse().ok()
}

/// The first host of a Slurm node list: `node[03-05,07],gpu1` → `node03`.
pub fn first_host(list: &str) -> Result<String> {
    let list = list.trim();
    let first = match list.find(['[', ',']) {
        Some(i) if list.as_bytes()[i] == b'[' => {
            let close = list[i..]
                .find(']')
                .ok_or_else(|| anyhow!("Slurm node list {list:?}: no closing ']'"))?;
            let inner = &list[i + 1..i + close];
            let first_range = inner.split(',').next().unwrap_or("");
            let first_index = first_range.split('-').next().unwrap_or("");
            format!("{}{first_index}", &list[..i])
        }
        Some(i) => list[..i].to_string(),
        None => list.to_string(),
    };
    if first.is_empty() {
        bail!("Slurm node list {list:?} names no host");
    }
    Ok(first)
}

/// Which c10d backend a group uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors.
    Gloo,
    /// CUDA tensors.
    Nccl,
}

impl Backend {
    pub fn for_device(device: Device) -> Backend {
        match device {
            Device::Cuda(_) => Backend::Nccl,
            _ => Backend::Gloo,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        }
    }
}

/// Call a shim function that returns a status and may fill `err`.
fn call(what: &str, f: impl FnOnce(*mut c_char, usize) -> i64) -> Result<i64, String> {
    let mut err = [0 as c_char; 1024];
    let rc = f(err.as_mut_ptr(), err.len());
    if rc < 0 {
        // SAFETY: the shim leaves a NUL-terminated message in `err` when it fails.
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
        Err(format!("{what}: {}", msg.trim()))
    } else {
        Ok(rc)
    }
}

fn c_string(s: &str) -> CString {
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

/// A c10d process group of the job's ranks, with its rendezvous store.
pub struct Group {
    ptr: *mut c_void,
    pub backend: Backend,
    rank: usize,
    size: usize,
    timeout: Duration,
    /// Collectives run so far, for the error key of a failing one.
    calls: std::cell::Cell<u64>,
    /// The connections were closed after this rank's failure (`close_after_error`).
    closed: std::cell::Cell<bool>,
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `sipt_dist_init` and is freed once.
        unsafe { sipt_dist_free(self.ptr) }
    }
}

/// The store key under which a rank posts its fatal error.
fn error_key(rank: usize) -> String {
    format!("sipt/error/{rank}")
}

impl Group {
    /// Join the job's group: every rank connects to the store rank 0 serves at the world's
    /// master address (waiting at most `timeout` for all of them).
    pub fn join(world: &World, backend: Backend, timeout: Duration) -> Result<Group> {
        if !available() {
            bail!(
                "this build of sipt has no c10d process groups: Gloo's headers were missing when it was built (install Debian's libgloo-dev, or run scripts/setup.sh, and rebuild)"
            );
        }
        let host = c_string(&world.master_addr);
        let name = c_string(backend.name());
        let mut err = [0 as c_char; 1024];
        // SAFETY: the strings and the error buffer outlive the call.
        let ptr = unsafe {
            sipt_dist_init(
                host.as_ptr(),
                world.master_port as i32,
                world.rank as i32,
                world.size as i32,
                timeout.as_millis() as i64,
                name.as_ptr(),
                i32::from(!world.agent_store),
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if ptr.is_null() {
            // SAFETY: as in `call`.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
            bail!(
                "rank {} cannot join the {} group of {} at {}:{} within {:.0} s: {}",
                world.rank,
                backend.name(),
                world.size,
                world.master_addr,
                world.master_port,
                timeout.as_secs_f64(),
                msg.trim()
            );
        }
        Ok(Group {
            ptr,
            backend,
            rank: world.rank,
            size: world.size,
            timeout,
            calls: std::cell::Cell::new(0),
            closed: std::cell::Cell::new(false),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Explain a failed collective: a rank that posted its error, else a peer that went away.
    fn failure(&self, what: &str, detail: String) -> anyhow::Error {
        for r in (0..self.size).filter(|&r| r != self.rank) {
            if let Some(msg) = self.posted_error(r) {
                return PeerFailure(format!("rank {r} failed: {msg}")).into();
            }
        }
        PeerFailure(format!(
            "{detail}: another rank stopped, or did not reach this {what} within distributed.timeout_s = {:.0}",
            self.timeout.as_secs_f64()
        ))
        .into()
    }

    fn collective(&self, what: &str, f: impl FnOnce(*mut c_char, usize) -> i64) -> Result<()> {
        if self.closed.get() {
            bail!("{what} after this rank's group was closed on its failure");
        }
        self.calls.set(self.calls.get() + 1);
        call(what, f).map(|_| ()).map_err(|e| self.failure(what, e))
    }

    /// Sum `tensor` over every rank, in place.
    pub fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        let ptr = tensor.as_mut_ptr();
        // SAFETY: the tensor handle stays alive and is written in place.
        self.collective("all-reduce", |err, len| unsafe {
            sipt_dist_all_reduce_sum(self.ptr, ptr, err, len) as i64
        })
    }

    /// Every rank's `input` (one shape on all ranks), stacked: `(size, *input.shape)`.
    pub fn all_gather(&self, input: &Tensor) -> Result<Tensor> {
        let input = input.contiguous();
        let mut shape = vec![self.size as i64];
        shape.extend(input.size());
        let mut output = Tensor::zeros(&shape, (input.kind(), input.device()));
        let out = output.as_mut_ptr();
        // SAFETY: both handles stay alive for the call.
        self.collective("all-gather", |err, len| unsafe {
            sipt_dist_all_gather(self.ptr, input.as_ptr(), out, err, len) as i64
        })?;
        Ok(output)
    }

    /// `tensor` as rank `root` holds it, on every rank (in place).
    pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        let ptr = tensor.as_mut_ptr();
        // SAFETY: as in `all_reduce_sum`.
        self.collective("broadcast", |err, len| unsafe {
            sipt_dist_broadcast(self.ptr, ptr, root as i32, err, len) as i64
        })
    }

    /// Post this rank's fatal error for the others to name (best effort).
    pub fn post_error(&self, message: &str) {
        let key = c_string(&error_key(self.rank));
        let bytes = message.as_bytes();
        // SAFETY: the key and the bytes outlive the call.
        let _ = call("store", |err, len| unsafe {
            sipt_dist_store_set(
                self.ptr,
                key.as_ptr(),
                bytes.as_ptr(),
                bytes.len(),
                err,
                len,
            ) as i64
        });
    }

    /// After posting this rank's fatal error: close the group's connections, so that peers
    /// waiting in a collective with this rank fail now, and keep the store (which rank 0 serves)
    /// up until every other rank has posted its own error (each reads this one first) or
    /// `deadline` passes. Without it the store could go away with this process before a peer
    /// had read the error, which it then could not name. No collective may follow.
    pub fn close_after_error(&self, deadline: Duration) {
        if self.closed.replace(true) {
            return;
        }
        // SAFETY: `ptr` is live; the shim keeps the store and drops only the backend.
        unsafe { sipt_dist_close_backend(self.ptr) };
        let until = std::time::Instant::now() + deadline;
        let others = || (0..self.size).filter(|&r| r != self.rank);
        while std::time::Instant::now() < until {
            if others().all(|r| self.posted_error(r).is_some()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The error rank `rank` posted, if it did.
    fn posted_error(&self, rank: usize) -> Option<String> {
        let key = c_string(&error_key(rank));
        // SAFETY: the key outlives the call.
        let found = call("store", |err, len| unsafe {
            sipt_dist_store_check(self.ptr, key.as_ptr(), err, len) as i64
        })
        .ok()?;
        if found != 1 {
            return None;
        }
        let mut buf = vec![0u8; 2048];
        // SAFETY: `buf` has room for `cap` bytes.
        let n = call("store", |err, len| unsafe {
            sipt_dist_store_get(
                self.ptr,
                key.as_ptr(),
                buf.as_mut_ptr(),
                buf.len(),
                err,
                len,
            )
        })
        .ok()? as usize;
        buf.truncate(n.min(buf.len()));
        Some(String::from_utf8_lossy(&buf).into_owned())
    }
}

/// The collectives of a training loop over a world: the identity in a world of one.
pub struct Dist {
    pub world: World,
    group: Option<Group>,
    /// Where collectives' tensors live (CPU for Gloo, the rank's GPU for NCCL).
    device: Device,
}

impl Dist {
    pub fn single() -> Dist {
        Dist {
            world: World::single(),
            group: None,
            device: Device::Cpu,
        }
    }

    /// Join `world`'s group for tensors on `device` (a world of one joins nothing).
    pub fn join(world: World, device: Device, timeout: Duration) -> Result<Dist> {
        let group = if world.is_single() {
            None
        } else {
            Some(Group::join(&world, Backend::for_device(device), timeout)?)
        };
        let device = match device {
            Device::Cuda(_) => device,
            _ => Device::Cpu,
        };
        Ok(Dist {
            world,
            group,
            device,
        })
    }

    pub fn rank(&self) -> usize {
        self.world.rank
    }

    pub fn size(&self) -> usize {
        self.world.size
    }

    /// This rank's share of `n` items split among the ranks in order: `start..end`, as equal as
    /// the count allows (all of them alone).
    pub fn share(&self, n: usize) -> std::ops::Range<usize> {
        let (r, k) = (self.world.rank, self.world.size);
        n * r / k..n * (r + 1) / k
    }

    /// Whether this rank writes the run's files (metrics, samples, checkpoints, W&B).
    pub fn is_writer(&self) -> bool {
        self.world.rank == 0
    }

    pub fn group(&self) -> Option<&Group> {
        self.group.as_ref()
    }

    /// The device this rank computes on (meaningful in a world of several ranks).
    pub fn device(&self) -> Device {
        self.device
    }

    /// Sum each value over the ranks.
    pub fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        let Some(g) = &self.group else { return Ok(()) };
        if values.is_empty() {
            return Ok(());
        }
        let mut t = Tensor::from_slice(values).to_device(self.device);
        g.all_reduce_sum(&mut t)?;
        let summed: Vec<f64> = Vec::try_from(t.to_device(Device::Cpu))
            .map_err(|e| anyhow!("reading an all-reduced tensor: {e}"))?;
        values.copy_from_slice(&summed);
        Ok(())
    }

    /// Every rank's bytes, in rank order.
    pub fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let Some(g) = &self.group else {
            return Ok(vec![bytes.to_vec()]);
        };
        let lengths =
            g.all_gather(&Tensor::from_slice(&[bytes.len() as i64]).to_device(self.device))?;
        let lengths: Vec<i64> = Vec::try_from(lengths.to_device(Device::Cpu).reshape([-1]))
            .map_err(|e| anyhow!("reading gathered lengths: {e}"))?;
        let longest = lengths.iter().copied().max().unwrap_or(0).max(1) as usize;
        let mut padded = bytes.to_vec();
        padded.resize(longest, 0);
        let gathered = g.all_gather(&Tensor::from_slice(&padded).to_device(self.device))?;
        let flat: Vec<u8> = Vec::try_from(gathered.to_device(Device::Cpu).reshape([-1]))
            .map_err(|e| anyhow!("reading gathered bytes: {e}"))?;
        Ok(lengths
            .iter()
            .enumerate()
            .map(|(r, &n)| flat[r * longest..r * longest + n as usize].to_vec())
            .collect())
    }

    /// Fail unless every rank passes the same `value` (their configurations, their builds):
    /// the error names the ranks that differ from rank 0.
    pub fn agree(&self, what: &str, value: &str) -> Result<()> {
        let all = self.all_gather_bytes(value.as_bytes())?;
        let differ: Vec<String> = all
            .iter()
            .enumerate()
            .filter(|(_, v)| **v != all[0])
            .map(|(r, _)| r.to_string())
            .collect();
        if !differ.is_empty() {
            bail!(
                "rank(s) {} have a different {what} than rank 0; every rank must run the same experiment with the same build",
                differ.join(", ")
            );
        }
        Ok(())
    }

    /// Sum the gradients of `vs`'s trainable variables over the ranks, flattened into buckets
    /// of about `bucket_bytes` so that a model makes few collectives (nothing to do alone).
    pub fn reduce_gradients(&self, vs: &tch::nn::VarStore, bucket_bytes: usize) -> Result<()> {
        let Some(g) = &self.group else { return Ok(()) };
        let grads: Vec<Tensor> = vs
            .trainable_variables()
            .iter()
            .map(|p| p.grad())
            .filter(|g| g.defined())
            .collect();
        let mut bucket: Vec<&Tensor> = Vec::new();
        let mut bytes = 0usize;
        let flush = |bucket: &mut Vec<&Tensor>| -> Result<()> {
            if bucket.is_empty() {
                return Ok(());
            }
            tch::no_grad(|| -> Result<()> {
                let flat: Vec<Tensor> = bucket.iter().map(|t| t.reshape([-1])).collect();
                let mut joined = Tensor::cat(&flat, 0).to_device(self.device);
                g.all_reduce_sum(&mut joined)?;
                let mut at = 0i64;
                for t in bucket.iter() {
                    let n = t.numel() as i64;
                    let part = joined.narrow(0, at, n).view_as(t).to_device(t.device());
                    let mut dst = (*t).shallow_clone();
                    dst.copy_(&part);
                    at += n;
                }
                Ok(())
            })?;
            bucket.clear();
            Ok(())
        };
        for grad in &grads {
            bucket.push(grad);
            bytes += grad.numel() * grad.kind().elt_size_in_bytes();
            if bytes >= bucket_bytes {
                flush(&mut bucket)?;
                bytes = 0;
            }
        }
        flush(&mut bucket)
    }

    /// Every rank's `params` as rank 0 holds them (the same start everywhere).
    pub fn broadcast_params(&self, params: &[Tensor]) -> Result<()> {
        let Some(g) = &self.group else { return Ok(()) };
        tch::no_grad(|| -> Result<()> {
            for p in params {
                let mut t = p.detach().to_device(self.device).contiguous();
                g.broadcast(&mut t, 0)?;
                let mut dst = p.shallow_clone();
                dst.copy_(&t.to_device(p.device()));
            }
            Ok(())
        })
    }

    /// Post this rank's fatal error so that the others name it (no-op alone).
    pub fn post_error(&self, message: &str) {
        if let Some(g) = &self.group {
            g.post_error(message);
        }
    }

    /// [`Group::close_after_error`] (no-op alone).
    pub fn close_after_error(&self, deadline: Duration) {
        if let Some(g) = &self.group {
            g.close_after_error(deadline);
        }
    }

    /// Wait until every rank gets here.
    pub fn barrier(&self) -> Result<()> {
        let mut one = [1.0];
        self.sum_f64(&mut one)
            .context("waiting for every rank (barrier)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn free_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    fn world(vars: &[(&str, &str)]) -> Result<World> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        World::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn torchrun_slurm_and_alone() {
        let w = world(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "29511"),
        ])
        .unwrap();
        assert_eq!((w.rank, w.size, w.local_rank, w.local_size), (3, 4, 1, 2));
        assert_eq!((w.master_addr.as_str(), w.master_port), ("node7", 29511));

        let w = world(&[
            ("SLURM_PROCID", "2"),
            ("SLURM_STEP_NUM_TASKS", "4"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_STEP_TASKS_PER_NODE", "2(x2)"),
            ("SLURM_STEP_NODELIST", "gpu[07-08]"),
            ("SLURM_JOB_ID", "123"),
        ])
        .unwrap();
        assert_eq!((w.rank, w.size, w.local_rank, w.local_size), (2, 4, 0, 2));
        assert_eq!((w.master_addr.as_str(), w.master_port), ("gpu07", 20123));

        // A batch script's own step (one task) and no variables at all: one process.
        assert!(
            world(&[("SLURM_PROCID", "0"), ("SLURM_STEP_NUM_TASKS", "1")])
                .unwrap()
                .is_single()
        );
        assert!(world(&[]).unwrap().is_single());

        let err = world(&[("RANK", "4"), ("WORLD_SIZE", "4")]).unwrap_err();
        assert!(
            err.to_string().contains("expected 0 <= RANK < WORLD_SIZE"),
            "{err}"
        );
        let err = world(&[("RANK", "x"), ("WORLD_SIZE", "4")]).unwrap_err();
        assert!(err.to_string().contains("RANK = \"x\""), "{err}");
    }

    #[test]
    fn a_group_of_one_all_reduces_and_nccl_needs_a_gpu() {
        let world = World {
            master_port: free_port(),
            ..World::single()
        };
        let g = Group::join(&world, Backend::Gloo, Duration::from_secs(30)).unwrap();
        let mut t = Tensor::from_slice(&[1.0f32, 2.0]);
        g.all_reduce_sum(&mut t).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.0, 2.0]);
        let gathered = g.all_gather(&t).unwrap();
        assert_eq!(gathered.size(), vec![1, 2]);
        drop(g);
        // Where this libtorch has CUDA, the build has NCCL; without a GPU, c10d itself says so.
        if tch::utils::has_cuda() {
            assert!(
                has_nccl(),
                "libtorch has CUDA but sipt was built without NCCL (run scripts/setup.sh)"
            );
        }
        if has_nccl() && !tch::Cuda::is_available() {
            let world = World {
                master_port: free_port(),
                ..World::single()
            };
            let err = Group::join(&world, Backend::Nccl, Duration::from_secs(30))
                .err()
                .expect("an NCCL group without a GPU");
            let text = format!("{err:#}");
            eprintln!("{text}");
            assert!(text.contains("GPU"), "{text}");
            assert!(!text.contains("no NCCL backend"), "{text}");
        }
    }

    #[test]
    fn first_hosts_of_node_lists() {
        assert_eq!(first_host("node[03-05,07],gpu1").unwrap(), "node03");
        assert_eq!(first_host("a1,a2").unwrap(), "a1");
        assert_eq!(first_host("solo").unwrap(), "solo");
        assert!(first_host("").is_err());
    }
}
