//! The `vm-activator` binary: parse flags, load the configuration, set up logging,
//! run the server until SIGTERM. Everything else lives in the library.

use anyhow::Context;
use clap::Parser;
use vm_activator::config::{Cli, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = vm_activator::telemetry::init(cli.log_format).context("telemetry (OTEL_* variables)")?;
    let config = Config::load(&cli).context("configuration")?;
    let result = vm_activator::server::run(config).await.context("vm-activator");
    // The spans still queued are exported before the process ends (bounded by
    // OTEL_BSP_EXPORT_TIMEOUT); the batch processor's thread blocks, so not on a worker.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    result?;
    Ok(())
}
