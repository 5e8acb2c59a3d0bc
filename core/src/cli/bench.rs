//! `sipt bench`: the engine's micro-benchmarks, printed as JSON for the side-by-side scripts
//! in bench/.

use super::Exit;
use crate::bench;
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub(super) enum BenchCommand {
    /// Next-token training steps of a from-scratch model on random tokens.
    Train(bench::TrainBench),
    /// Rollouts: K samples of N tokens from each of P prefixes.
    Rollouts(bench::RolloutBench),
    /// Log-prob scoring without gradients (a SIP step's reference pass): time and peak memory.
    Score(bench::ScoreBench),
    /// One online-DPO SIP step, through the SIP loop's own phases: sample, a trivial reward,
    /// select, policy and reference log-probs, update.
    SipStep(bench::SipStepBench),
    /// Tournament designs: judge calls per pool and rank agreement with all-pairs.
    Tournaments(bench::TournamentBench),
    /// c10d all-reduce over a process group of this machine's ranks (Gloo or NCCL): time per
    /// all-reduce and bus bandwidth, the sum checked.
    Collectives(bench::CollectivesBench),
}

pub(super) fn bench(command: BenchCommand) -> Result<(), Exit> {
    let result = match command {
        BenchCommand::Train(t) => bench::train(&t)?,
        BenchCommand::Rollouts(r) => bench::rollouts(&r)?,
        BenchCommand::Score(s) => bench::score(&s)?,
        BenchCommand::SipStep(s) => bench::sip_step(&s)?,
        BenchCommand::Tournaments(t) => {
            for line in bench::tournaments(&t)? {
                println!("{line}");
            }
            return Ok(());
        }
        BenchCommand::Collectives(c) => {
            let world = crate::dist::World::from_env()?;
            if c.nproc_per_node > 1 && world.is_single() {
                let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
                crate::dist::launch::launch(
                    c.nproc_per_node,
                    &args,
                    std::time::Duration::from_secs(5),
                )?;
                return Ok(());
            }
            match bench::collectives(&c)? {
                Some(result) => result,
                None => return Ok(()),
            }
        }
    };
    println!("{result}");
    Ok(())
}
