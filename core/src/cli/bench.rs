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
    /// One online-DPO SIP step, through the SIP loop's own phases: sample, a trivial reward,
    /// select, policy and reference log-probs, update.
    SipStep(bench::SipStepBench),
    /// Tournament designs: judge calls per pool and rank agreement with all-pairs.
    Tournaments(bench::TournamentBench),
}

pub(super) fn bench(command: BenchCommand) -> Result<(), Exit> {
    let result = match command {
        BenchCommand::Train(t) => bench::train(&t)?,
        BenchCommand::Rollouts(r) => bench::rollouts(&r)?,
        BenchCommand::SipStep(s) => bench::sip_step(&s)?,
        BenchCommand::Tournaments(t) => {
            for line in bench::tournaments(&t)? {
                println!("{line}");
            }
            return Ok(());
        }
    };
    println!("{result}");
    Ok(())
}
