//! The `vm-activator` binary: parse flags, load the configuration, set up logging,
//! run the server until SIGTERM — or, with `simulate`, compare idle policies on a trace.
//! Everything else lives in the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use vm_activator::config::{Cli, Config};
use vm_activator::simulate::SimulateArgs;

/// The command line: the server's flags, or a subcommand.
#[derive(Parser)]
#[command(
    name = "vm-activator",
    version,
    about = "Scale-to-zero for virtual machines, driven by CloudEvents",
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(flatten)]
    server: Cli,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Compare idle policies on an invocation trace, in simulated time, with the policy
    /// code the activator runs.
    Simulate(SimulateArgs),
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Some(Command::Simulate(simulate)) => {
            print!("{}", vm_activator::simulate::run(&simulate)?);
            Ok(())
        }
        None => serve(args.server),
    }
}

/// The control plane's runtime — VM owners, the backend's watches, the admin listener,
/// the acceptor — on the main thread alone: the ingress's connections are served on
/// worker threads of their own (`ingress.worker_threads`), so a second control-plane
/// thread would only cost memory (an idle process's RSS is its budget).
#[tokio::main(flavor = "current_thread")]
async fn serve(cli: Cli) -> anyhow::Result<()> {
    let telemetry = vm_activator::telemetry::init(cli.log_format).context("telemetry (OTEL_* variables)")?;
    let config = Config::load(&cli).context("configuration")?;
    let result = vm_activator::server::run(config).await.context("vm-activator");
    // The spans still queued are exported before the process ends (bounded by
    // OTEL_BSP_EXPORT_TIMEOUT); the batch processor's thread blocks, so not on a worker.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    result?;
    Ok(())
}
