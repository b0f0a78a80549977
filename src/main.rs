//! The `vm-activator` binary: parse flags, load the configuration, set up logging,
//! run the server until SIGTERM. Everything else lives in the library.

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use vm_activator::config::{Cli, Config, LogFormat};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    let config = Config::load(&cli).context("configuration")?;
    vm_activator::server::run(config).await.context("vm-activator")?;
    Ok(())
}
