//! `stepbox serve`, `stepbox token` and `stepbox deploy`: running the
//! service, managing its API tokens, and deploying workflows to it.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use bytesize::ByteSize;
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use tokio_util::sync::CancellationToken;

use super::client::Client;
use super::report::when;
use super::{CliError, Place, open_database};
use crate::cluster::HANDED_OVER;
use crate::service::{Bundle, Service, ServiceConfig, create_token};
use crate::store::WorkflowVersion;
use crate::tenant::Tenants;
use crate::workflow::Workflow;

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  stepbox token create --tenant acme
  stepbox serve
  stepbox serve --listen 0.0.0.0:7433 --tenants tenants.yaml --grace 60s
  stepbox serve --db postgres://stepbox@db.internal/stepbox --queue

Without a tenants file, tenants' steps get no directories, network, HTTP hosts or secrets; write one
(docs/tenants.md) to grant them. On SIGTERM or Ctrl-C, running attempts get --grace to finish; the
rest are interrupted and their runs resume when the service starts again.

Several `stepbox serve` processes may share one PostgreSQL --db: any of them takes a deploy, starts
runs and answers for every run; a run whose node died is taken over by another within a lease
(30s). With --queue, their attempts run on `stepbox worker` processes.")]
pub(crate) struct ServeArgs {
    /// The address to listen on (port 0 picks a free one; the address is printed).
    #[arg(long, default_value = "127.0.0.1:7433", value_name = "ADDR")]
    listen: String,
    /// How long running attempts may take to finish on shutdown before they are interrupted.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    grace: humantime::Duration,
    /// Attempts running at once over all tenants, 1 to 4096 [default: twice the CPU cores, at least 4].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    max_parallel: Option<u32>,
    /// Runs one tenant may have started and not finished; past it, new runs get 429.
    #[arg(long, default_value_t = 1000, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_active_runs: u32,
    /// The largest bundle (all its files together) a deploy may upload.
    #[arg(long, default_value = "64MiB", value_name = "SIZE")]
    max_bundle: ByteSize,
    /// Hand the attempts to `stepbox worker` processes through the database's queue (--db, or the data directory's) instead of running them here; --max-parallel then counts attempts handed over at once [default: 256].
    #[arg(long)]
    queue: bool,
}

pub(crate) async fn serve(args: ServeArgs, place: &Place<'_>) -> Result<u8, CliError> {
    let mut config = ServiceConfig::new(place.data_dir.to_owned());
    config.db = place.db.map(str::to_owned);
    config.tenants = place.tenants.map(Path::to_owned);
    config.secrets_dir = place.secrets_dir.map(Path::to_owned);
    config.queue = args.queue;
    if args.queue {
        config.slots = HANDED_OVER;
    }
    if let Some(slots) = args.max_parallel {
        config.slots = slots as usize;
    }
    config.max_active_runs = args.max_active_runs as usize;
    config.max_bundle_bytes = args.max_bundle.as_u64();
    let slots = config.slots;
    let service = Service::start(config).await.map_err(|err| CliError::Failed(err.to_string()))?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|err| CliError::Usage(format!("cannot listen on {}: {err}; choose another --listen", args.listen)))?;
    let address = listener.local_addr().map_err(|err| CliError::Failed(err.to_string()))?;
    println!("stepbox is serving http://{address}/v1");
    let _ = std::io::stdout().flush();
    let slots = if args.queue {
        format!("{slots} attempts handed to workers at once")
    } else {
        format!("{slots} attempt slots")
    };
    eprintln!(
        "data directory {}, {slots}; {} runs resumed; Ctrl-C or SIGTERM stops it",
        place.data_dir.display(),
        service.active_runs()
    );
    let stop = CancellationToken::new();
    tokio::spawn(stop_on_signal(stop.clone()));
    let server = tokio::spawn(crate::server::serve(service.clone(), listener, stop.clone().cancelled_owned()));
    stop.cancelled().await;
    let grace = std::time::Duration::from(args.grace);
    eprintln!("stopping: running attempts have {} to finish", humantime::format_duration(grace));
    service.shutdown(grace).await;
    match server.await {
        Ok(Ok(())) => {
            eprintln!("stopped");
            Ok(0)
        }
        Ok(Err(err)) => Err(CliError::Failed(format!("the server failed: {err}"))),
        Err(err) => Err(CliError::Failed(format!("the server failed: {err}"))),
    }
}

/// Ctrl-C or SIGTERM.
async fn stop_on_signal(stop: CancellationToken) {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(err) => {
            tracing::warn!("cannot watch for SIGTERM: {err}");
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    stop.cancel();
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a token and print it (only its hash is kept: it cannot be shown again).
    #[command(after_help = "Examples:\n  stepbox token create --tenant acme --name ci\n  stepbox token create --admin")]
    Create(CreateTokenArgs),
    /// List tokens (never the tokens themselves).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by its id (see `stepbox token list`).
    Revoke {
        /// The token's id.
        id: String,
    },
}

#[derive(Debug, clap::Args)]
#[group(required = true, args = ["tenant", "admin"])]
pub(crate) struct CreateTokenArgs {
    /// The tenant the token acts for.
    #[arg(long, conflicts_with = "admin")]
    tenant: Option<String>,
    /// An admin token, which may act for any tenant (naming it in the Stepbox-Tenant header).
    #[arg(long)]
    admin: bool,
    /// What the token is for, to tell tokens apart in `stepbox token list`.
    #[arg(long, default_value = "")]
    name: String,
}

/// The longest tenant name.
const MAX_TENANT: usize = 64;

pub(crate) fn token(command: TokenCommand, place: &Place<'_>) -> Result<u8, CliError> {
    let db = open_database(place)?;
    match command {
        TokenCommand::Create(args) => {
            if let Some(tenant) = &args.tenant {
                if tenant.is_empty()
                    || tenant.len() > MAX_TENANT
                    || tenant.chars().any(|c| c.is_control() || c.is_whitespace())
                {
                    return Err(CliError::Usage(format!(
                        "`{}` cannot name a tenant: use 1 to {MAX_TENANT} characters without spaces",
                        tenant.escape_debug()
                    )));
                }
                if let Some(file) = place.tenants {
                    Tenants::load(file)?.get(tenant)?;
                }
            }
            let token = create_token(db.as_ref(), args.tenant.as_deref(), &args.name)?;
            let who = args.tenant.map_or_else(|| "an admin".to_owned(), |tenant| format!("tenant `{tenant}`"));
            eprintln!("token {} for {who}; it is shown once, keep it secret:", token.record.id);
            println!("{}", token.secret);
            Ok(0)
        }
        TokenCommand::List { json } => {
            let tokens = db.list_tokens()?;
            if json {
                let text = serde_json::to_string_pretty(&tokens).map_err(|err| CliError::Failed(err.to_string()))?;
                println!("{text}");
                return Ok(0);
            }
            let mut table = Table::new();
            table.load_style(UTF8_BORDERS_ONLY).set_header(["id", "tenant", "name", "created", "revoked"]);
            for token in tokens {
                table.add_row([
                    token.id,
                    token.tenant.unwrap_or_else(|| "(admin)".into()),
                    token.name,
                    when(token.created_ms as f64),
                    token.revoked_ms.map(|ms| when(ms as f64)).unwrap_or_default(),
                ]);
            }
            println!("{table}");
            Ok(0)
        }
        TokenCommand::Revoke { id } => {
            if !db.revoke_token(&id)? {
                return Err(CliError::Usage(format!(
                    "no live token `{id}`; `stepbox token list` shows the tokens and which are revoked"
                )));
            }
            eprintln!("revoked token {id}");
            Ok(0)
        }
    }
}

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  stepbox deploy orders.yaml --server http://127.0.0.1:7433 --token $STEPBOX_TOKEN
  stepbox deploy orders.yaml --file regions/eu.yaml --file regions/us.yaml

Uploads the workflow file, its components and the workflows it includes (with theirs); a workflow
included through a template must be added with --file. Deploying the same files again keeps the
version; a change makes a new version. Runs keep the version they started with.")]
pub(crate) struct DeployArgs {
    /// The workflow file.
    file: PathBuf,
    /// Another file to upload with it (a workflow included through a template). Repeatable.
    #[arg(long = "file", value_name = "FILE")]
    extra: Vec<PathBuf>,
    /// Print the deployed version as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn deploy(args: DeployArgs, client: &Client) -> Result<u8, CliError> {
    let workflow = Workflow::load(&args.file)?;
    let bundle = Bundle::of_workflow(&workflow, &args.extra).map_err(CliError::Usage)?;
    let files = bundle.files.len();
    let size = bundle.size();
    let (version, created): (WorkflowVersion, bool) =
        client.put(&["workflows", &workflow.name], &bundle.encode()).await?;
    if args.json {
        let text = serde_json::to_string_pretty(&version).map_err(|err| CliError::Failed(err.to_string()))?;
        println!("{text}");
    } else if created {
        println!(
            "deployed `{}` version {} ({files} files, {})",
            version.name,
            version.version,
            ByteSize(size as u64).display().iec()
        );
    } else {
        println!("`{}` is unchanged: version {} is already these files", version.name, version.version);
    }
    Ok(0)
}
