//! `sipt run --nproc-per-node N`: start N ranks on this machine, as `torchrun --standalone`
//! does, and watch them. Each rank is this same program with the same arguments and torchrun's
//! environment contract (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
//! `MASTER_PORT`). When one rank fails or dies, the others notice at their next collective and
//! stop (with [`super::PEER_FAILURE_EXIT`]); any still running after `grace` are killed, and the
//! launcher names the rank that failed first by itself, and how.

use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on the loopback interface for the rendezvous (or `MASTER_PORT`).
fn rendezvous_port() -> Result<u16> {
    if let Ok(p) = std::env::var("MASTER_PORT") {
        return p
            .trim()
            .parse()
            .with_context(|| format!("MASTER_PORT = {p:?}: expected a port number"));
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .context("cannot find a free port on 127.0.0.1 for the ranks' rendezvous")?;
    Ok(listener.local_addr()?.port())
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(9)) => "was killed (SIGKILL)".into(),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "ended".into(),
    }
}

/// Run `args` (this program's arguments for one rank) as `nproc` local ranks and wait for all
/// of them. `grace`: how long the other ranks may take to stop after one fails.
pub fn launch(nproc: usize, args: &[OsString], grace: Duration) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find this program to start its ranks")?;
    let port = rendezvous_port()?;
    tracing::info!("starting {nproc} ranks (rendezvous on 127.0.0.1:{port})");
    let mut children: Vec<Option<Child>> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let mut cmd = Command::new(&exe);
        cmd.args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdin(Stdio::null());
        // SAFETY: only async-signal-safe calls between fork and exec: a rank dies with its
        // launcher instead of running on alone.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(child) => children.push(Some(child)),
            Err(e) => {
                for c in children.iter_mut().flatten() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                bail!("cannot start rank {rank} ({}): {e}", exe.display());
            }
        }
    }

    // Failed ranks in the order they ended: (rank, how, whether it only followed another).
    let mut failures: Vec<(usize, String, bool)> = Vec::new();
    let mut failed_at: Option<Instant> = None;
    loop {
        let mut running = 0;
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            match child.try_wait() {
                Ok(Some(status)) => {
                    *slot = None;
                    if !status.success() {
                        let follower = status.code() == Some(super::PEER_FAILURE_EXIT as i32);
                        failures.push((rank, describe(status), follower));
                        failed_at.get_or_insert_with(Instant::now);
                    }
                }
                Ok(None) => running += 1,
                Err(e) => bail!("cannot wait for rank {rank}: {e}"),
            }
        }
        if running == 0 {
            break;
        }
        if failed_at.is_some_and(|t| t.elapsed() > grace) {
            for (rank, slot) in children.iter_mut().enumerate() {
                if let Some(child) = slot {
                    tracing::warn!(
                        "rank {rank} did not stop within {:.0} s of the failure: killing it",
                        grace.as_secs_f64()
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                    failures.push((rank, "was killed by the launcher".into(), true));
                    *slot = None;
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The cause: the first rank that failed by itself (not because another one did).
    let cause = failures
        .iter()
        .position(|f| !f.2)
        .or((!failures.is_empty()).then_some(0));
    if let Some(i) = cause {
        let (rank, how, _) = &failures[i];
        let mut others: Vec<usize> = failures
            .iter()
            .filter(|f| f.0 != *rank)
            .map(|f| f.0)
            .collect();
        others.sort_unstable();
        let then = if others.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = others.iter().map(|r| r.to_string()).collect();
            format!("; rank(s) {} stopped after it", list.join(", "))
        };
        bail!("rank {rank} of {nproc} {how}{then}");
    }
    Ok(())
}
