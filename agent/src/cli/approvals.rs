//! `interlock approvals …` and `interlock grants …`: answering held
//! commands over the admin socket, as whoever runs the command.
use std::{process::ExitCode, time::Duration};

use clap::{Args, Subcommand};

use super::{ConfigArg, call_agent};
use crate::{
    admin::Request,
    approvals::{GrantRecord, RequestRecord, now_ms},
};

#[derive(Subcommand)]
pub enum ApprovalsCommand {
    /// Pending requests you may answer (admins see all), oldest first.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Every request on record, answered ones too (admins).
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Approve a held command (an id or a unique prefix of one).
    Approve {
        id: String,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Deny a held command; the client gets an error with your reason.
    Deny {
        id: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Subcommand)]
pub enum GrantsCommand {
    /// Active grants (`--all`: expired and revoked ones too).
    List {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// End a grant before it expires.
    Revoke {
        id: String,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// `interlock request --target orders-db --statements delete --tables
/// public.orders --for 30m --reason "INC-4211 cleanup"`.
#[derive(Args)]
pub struct RequestArgs {
    /// The target the grant is for.
    #[arg(long)]
    target: String,
    /// How long the grant lasts once approved (at most the rule's
    /// max_duration), e.g. 30m.
    #[arg(long = "for", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Why, for the approvers (default: INTERLOCK_REASON).
    #[arg(long)]
    reason: Option<String>,
    /// SQL targets: statement kinds, e.g. delete,update (default: all the
    /// rule is about).
    #[arg(long, value_delimiter = ',')]
    statements: Vec<String>,
    /// SQL targets: schema.table names (default: all the rule is about).
    #[arg(long, value_delimiter = ',')]
    tables: Vec<String>,
    /// The requestable rule to ask under (default: the first that can
    /// grant the rest).
    #[arg(long)]
    rule: Option<String>,
    /// Ask for every caller of this policy workload rather than for your
    /// own (admins and the rule's approvers).
    #[arg(long)]
    workload: Option<String>,
    /// Return once the request is made instead of waiting for its answer.
    #[arg(long)]
    no_wait: bool,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    config: ConfigArg,
}

pub fn request(args: RequestArgs) -> anyhow::Result<ExitCode> {
    let statements = args
        .statements
        .iter()
        .map(|kind| {
            serde_json::from_value(serde_json::Value::String(kind.trim().to_ascii_lowercase()))
                .map_err(|_| anyhow::anyhow!("--statements: {kind:?} is not a statement kind"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let wish = crate::approvals::ask::Wish {
        target: args.target,
        rule: args.rule,
        statements,
        tables: args.tables,
        duration: args.duration,
        reason: args.reason,
        for_workload: args.workload,
    };
    if !args.no_wait && !args.json {
        eprintln!(
            "asking for the grant; waiting for the approvers' answer (Ctrl-C leaves the request standing)"
        );
    }
    let data = call_agent(
        &args.config.config,
        Request::GrantAsk {
            wish,
            wait: !args.no_wait,
        },
    )?;
    let record: RequestRecord = serde_json::from_value(data.clone())?;
    if args.json {
        println!("{data}");
    } else {
        print_request(&record);
    }
    Ok(match record.state {
        crate::approvals::RequestState::Approved => {
            if let Some(grant) = record.grant_id.as_ref().filter(|_| !args.json) {
                println!(
                    "granted: grant {grant} lasts {} (interlock grants list)",
                    record.grant
                );
            }
            ExitCode::SUCCESS
        }
        crate::approvals::RequestState::Pending => ExitCode::SUCCESS,
        _ => {
            if !args.json {
                eprintln!("{}", record.refusal());
            }
            ExitCode::FAILURE
        }
    })
}

pub fn approvals(command: ApprovalsCommand) -> anyhow::Result<ExitCode> {
    match command {
        ApprovalsCommand::List { config, all, json } => {
            let data = call_agent(&config.config, Request::ApprovalsList { all })?;
            if json {
                println!("{data}");
                return Ok(ExitCode::SUCCESS);
            }
            let list: Vec<RequestRecord> = serde_json::from_value(data)?;
            if list.is_empty() {
                println!("no pending requests you may answer");
            }
            for request in &list {
                print_request(request);
            }
            Ok(ExitCode::SUCCESS)
        }
        ApprovalsCommand::Approve { id, reason, config } => answer(&config, id, true, reason),
        ApprovalsCommand::Deny { id, reason, config } => answer(&config, id, false, Some(reason)),
    }
}

fn answer(
    config: &ConfigArg,
    id: String,
    approve: bool,
    reason: Option<String>,
) -> anyhow::Result<ExitCode> {
    let data = call_agent(
        &config.config,
        Request::ApprovalAnswer {
            id,
            approve,
            reason,
        },
    )?;
    let record: RequestRecord = serde_json::from_value(data)?;
    let approvals = record.answers.iter().filter(|a| a.approve).count();
    match record.state {
        crate::approvals::RequestState::Pending => println!(
            "request {}: {approvals} of {} approvals; waiting for more",
            record.id, record.min_approvals
        ),
        crate::approvals::RequestState::Approved => {
            println!("request {} approved; the command runs now", record.id);
            if let Some(grant) = &record.grant_id {
                println!(
                    "grant {grant}: the same workload may run this rule's commands for {} (interlock grants revoke {grant})",
                    record.grant
                );
            }
        }
        state => println!("request {} {}", record.id, state.as_str()),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_request(request: &RequestRecord) {
    let age = Duration::from_secs(now_ms().saturating_sub(request.created_ms) / 1000);
    let left = Duration::from_secs(request.expires_ms.saturating_sub(now_ms()) / 1000);
    let who = &request.requester;
    println!("{}  {}", request.id, request.state.as_str());
    println!(
        "  workload  {} (uid {}) pid {} {} {}",
        who.user.as_deref().unwrap_or("-"),
        who.uid,
        who.pid,
        who.unit.as_deref().or(who.cgroup.as_deref()).unwrap_or("-"),
        who.exe.as_deref().unwrap_or("-"),
    );
    if !who.workloads.is_empty() {
        println!("  matches   {}", who.workloads.join(", "));
    }
    if let Some(reason) = &who.reason {
        println!("  reason    {reason} (stated by the caller)");
    }
    if let Some(job) = &who.job {
        let described = crate::approvals::describe_job(job);
        println!("  job       {}", described.trim_start_matches(", "));
    }
    println!("  target    {}", request.target);
    println!("  rule      {} (grant: {})", request.rule, request.grant);
    println!("  command   {}", request.command);
    println!(
        "  approvers {} ({} needed)",
        request.approvers.join(", "),
        request.min_approvals
    );
    if request.state == crate::approvals::RequestState::Pending {
        println!(
            "  age       {} (times out in {})",
            humantime::format_duration(age),
            humantime::format_duration(left)
        );
    }
    for answer in &request.answers {
        let verb = if answer.approve { "approved" } else { "denied" };
        match &answer.reason {
            Some(reason) => println!("  {verb} by {}: {reason}", answer.by),
            None => println!("  {verb} by {}", answer.by),
        }
    }
}

pub fn grants(command: GrantsCommand) -> anyhow::Result<ExitCode> {
    match command {
        GrantsCommand::List { config, all, json } => {
            let data = call_agent(&config.config, Request::GrantsList { all })?;
            if json {
                println!("{data}");
                return Ok(ExitCode::SUCCESS);
            }
            let list: Vec<GrantRecord> = serde_json::from_value(data)?;
            if list.is_empty() {
                println!("no active grants");
            }
            let now = now_ms();
            for grant in &list {
                let state = match (&grant.revoked, grant.expires_ms > now) {
                    (Some(revoked), _) => format!("revoked by {}", revoked.by),
                    (None, true) => format!(
                        "expires in {}",
                        humantime::format_duration(Duration::from_secs(
                            (grant.expires_ms - now) / 1000
                        ))
                    ),
                    (None, false) => "expired".into(),
                };
                println!("{}  {state}", grant.id);
                let holder = match &grant.workload {
                    Some(name) => format!("workload {name}"),
                    None => format!(
                        "uid {} in {}",
                        grant.requester.uid,
                        grant.requester.cgroup.as_deref().unwrap_or("-")
                    ),
                };
                println!(
                    "  rule {} on target {}, for {holder}",
                    grant.rule, grant.target
                );
                if let Some(scope) = &grant.scope {
                    println!("  covers {}", scope.describe());
                }
                if let Some(reason) = &grant.requester.reason {
                    println!("  reason {reason}");
                }
                println!(
                    "  approved by {} (request {})",
                    grant.approved_by.join(", "),
                    grant.request_id
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        GrantsCommand::Revoke { id, reason, config } => {
            let data = call_agent(&config.config, Request::GrantRevoke { id, reason })?;
            let grant: GrantRecord = serde_json::from_value(data)?;
            println!("grant {} revoked", grant.id);
            Ok(ExitCode::SUCCESS)
        }
    }
}
