//! One function per client subcommand: build the request, call, print. Saving outputs lives here too.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;

use sha2::{Digest as _, Sha256};

use super::{
    CancelArgs, ClientCommand, DownloadArgs, JobArgs, ListArgs, MachinesArgs, RunArgs, SubmitArgs, SubmitCmd,
    WatchArgs, WorkflowsArgs,
    connect::Clients,
    error::{CliError, Exit},
    follow::{self, End},
    json, params,
    render::{JobProgress, Printer, Resume},
};
use crate::proto::pb;

/// Dispatches one command.
pub(crate) async fn run(command: ClientCommand) -> Result<Exit, CliError> {
    match command {
        ClientCommand::Run(a) => run_job(a).await,
        ClientCommand::Submit(a) => submit_only(a).await,
        ClientCommand::Watch(a) => watch(a).await,
        ClientCommand::Get(a) => get(a).await,
        ClientCommand::List(a) => list(a).await,
        ClientCommand::Cancel(a) => cancel(a).await,
        ClientCommand::Download(a) => download(a).await,
        ClientCommand::Workflows(a) => workflows(a).await,
        ClientCommand::Machines(a) => machines(a).await,
    }
}

/// Fetches the workflow's schema, types the inputs and submits, with an idempotency key (`--request-id`,
/// else a fresh `cli-<uuid>`). Both calls are retried while the server is unavailable ([`Clients::call`]):
/// with the key, a submit whose answer was lost finds the job it created, and never makes a second one.
async fn submit(clients: &Clients, args: SubmitArgs) -> Result<pb::Job, CliError> {
    let SubmitArgs { workflow, image, params, prompt, request_id, priority, labels } = args;
    let get = pb::GetWorkflowRequest { name: workflow.clone() };
    let schema =
        clients.call("GetWorkflow", get, |mut c, r| async move { c.workflows.get_workflow(r).await }).await?;
    let inputs = params::build(&schema, image.as_deref(), prompt, &params)?;
    let request = pb::SubmitJobRequest {
        source: Some(pb::submit_job_request::Source::Workflow(workflow)),
        image: inputs.image,
        prompt: inputs.prompt.unwrap_or_default(),
        parameters: inputs.parameters,
        request_id: request_id.unwrap_or_else(|| format!("cli-{}", uuid::Uuid::new_v4())),
        priority,
        labels: labels.into_iter().collect(),
        deadline: None,
    };
    clients.call("SubmitJob", request, |mut c, r| async move { c.jobs.submit_job(r).await }).await
}

async fn run_job(args: RunArgs) -> Result<Exit, CliError> {
    let RunArgs { submit: what, out, reconnect_for, connect } = args;
    let printer = Printer { json: connect.json };
    let clients = Clients::connect(&connect).await?;
    let job = submit(&clients, what).await?;
    if printer.json {
        println!("{}", json::job(&job));
    } else {
        eprintln!("job {} submitted; if interrupted, follow it with `comfyrelay watch {}`", job.id, job.id);
    }
    follow_and_save(&clients, &job.id, &job.workflow, 0, reconnect_for, Some(&out), printer).await
}

async fn submit_only(args: SubmitCmd) -> Result<Exit, CliError> {
    let SubmitCmd { submit: what, connect } = args;
    let clients = Clients::connect(&connect).await?;
    let printer = Printer { json: connect.json };
    let job = submit(&clients, what).await?;
    printer.result(&json::job(&job), || job.id.clone());
    Ok(Exit::Success)
}

async fn watch(args: WatchArgs) -> Result<Exit, CliError> {
    let WatchArgs { job, after, out, reconnect_for, connect } = args;
    let clients = Clients::connect(&connect).await?;
    let printer = Printer { json: connect.json };
    follow_and_save(&clients, &job, "", after, reconnect_for, out.as_deref(), printer).await
}

/// Follows the job with live progress; on success saves its outputs into `out` (if given). The exit
/// code says how the job ended.
async fn follow_and_save(
    clients: &Clients,
    job_id: &str,
    workflow: &str,
    after: u64,
    reconnect_for: std::time::Duration,
    out: Option<&Path>,
    printer: Printer,
) -> Result<Exit, CliError> {
    let mut progress = JobProgress::new(printer.json, job_id, workflow);
    let end = match follow::follow(clients, job_id, after, reconnect_for, |n| progress.notice(n)).await {
        Ok(end) => end,
        Err(e) => {
            progress.abandon();
            return Err(e);
        }
    };
    progress.finish(&end);
    match end {
        End::Succeeded(outputs) => {
            if let Some(dir) = out {
                save_all(clients, job_id, &outputs, dir, printer).await?;
            }
            Ok(Exit::Success)
        }
        End::Failed(_) | End::Cancelled(_) => Ok(Exit::JobFailed),
    }
}

async fn get(args: JobArgs) -> Result<Exit, CliError> {
    let JobArgs { job, connect } = args;
    let clients = Clients::connect(&connect).await?;
    let get = pb::GetJobRequest { job_id: job };
    let job = clients.call("GetJob", get, |mut c, r| async move { c.jobs.get_job(r).await }).await?;
    Printer { json: connect.json }.result(&json::job(&job), || describe_job(&job));
    Ok(Exit::Success)
}

fn describe_job(j: &pb::Job) -> String {
    let mut lines = vec![
        format!("job       {}", j.id),
        format!("state     {}", json::state_name(j.state)),
        format!("workflow  {} {}", j.workflow, j.workflow_version),
    ];
    if j.queue_position > 0 {
        lines.push(format!("position  {}", j.queue_position));
    }
    if !j.machine_id.is_empty() {
        lines.push(format!("machine   {}", j.machine_id));
    }
    for (label, t) in [("created", &j.create_time), ("started", &j.start_time), ("ended", &j.end_time)] {
        if let serde_json::Value::String(s) = json::time(t.as_ref()) {
            lines.push(format!("{label:<9} {s}"));
        }
    }
    let mut inputs: Vec<_> = j.inputs.iter().collect();
    inputs.sort();
    for (k, v) in inputs {
        lines.push(format!("input     {k} = {v}"));
    }
    for o in &j.outputs {
        lines.push(format!(
            "output    {} ({}, {} bytes, {}x{})",
            o.filename, o.mime_type, o.size_bytes, o.width, o.height
        ));
    }
    if let Some(e) = &j.error {
        lines.push(format!("error     {}: {}", json::reason_name(e.reason), e.message));
    }
    lines.join("\n")
}

fn parse_state(s: &str) -> Result<i32, CliError> {
    let wanted = format!("JOB_STATE_{}", s.to_ascii_uppercase());
    match pb::JobState::from_str_name(&wanted) {
        Some(state) if state != pb::JobState::Unspecified => Ok(state as i32),
        _ => Err(CliError::Usage(format!(
            "--state {s:?}: expected queued, provisioning, running, succeeded, failed or cancelled"
        ))),
    }
}

async fn list(args: ListArgs) -> Result<Exit, CliError> {
    let ListArgs { states, workflow, labels, limit, connect } = args;
    let states = states.iter().map(|s| parse_state(s)).collect::<Result<Vec<_>, _>>()?;
    let clients = Clients::connect(&connect).await?;
    let printer = Printer { json: connect.json };
    let labels: HashMap<String, String> = labels.into_iter().collect();
    let mut page_token = String::new();
    let mut shown = 0;
    if !printer.json {
        println!("{:<36}  {:<12}  {:<20}  created", "job", "state", "workflow");
    }
    while shown < limit {
        let request = pb::ListJobsRequest {
            page_size: (limit - shown).min(500) as i32,
            page_token: page_token.clone(),
            states: states.clone(),
            workflow: workflow.clone().unwrap_or_default(),
            labels: labels.clone(),
        };
        let page =
            clients.call("ListJobs", request, |mut c, r| async move { c.jobs.list_jobs(r).await }).await?;
        for j in page.jobs.iter().take(limit - shown) {
            printer.result(&json::job(j), || {
                let created = json::time(j.create_time.as_ref());
                format!(
                    "{:<36}  {:<12}  {:<20}  {}",
                    j.id,
                    json::state_name(j.state),
                    j.workflow,
                    created.as_str().unwrap_or("")
                )
            });
            shown += 1;
        }
        if page.next_page_token.is_empty() || page.jobs.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    Ok(Exit::Success)
}

async fn cancel(args: CancelArgs) -> Result<Exit, CliError> {
    let CancelArgs { job, reason, connect } = args;
    let clients = Clients::connect(&connect).await?;
    let cancel = pb::CancelJobRequest { job_id: job, reason };
    let job = clients.call("CancelJob", cancel, |mut c, r| async move { c.jobs.cancel_job(r).await }).await?;
    Printer { json: connect.json }
        .result(&json::job(&job), || format!("job {}: {}", job.id, json::state_name(job.state)));
    Ok(Exit::Success)
}

async fn download(args: DownloadArgs) -> Result<Exit, CliError> {
    let DownloadArgs { job, filenames, out, connect } = args;
    let clients = Clients::connect(&connect).await?;
    let printer = Printer { json: connect.json };
    let get = pb::GetJobRequest { job_id: job.clone() };
    let found = clients.call("GetJob", get, |mut c, r| async move { c.jobs.get_job(r).await }).await?;
    let outputs: Vec<pb::Output> = if filenames.is_empty() {
        found.outputs
    } else {
        let mut chosen = Vec::new();
        for name in &filenames {
            match found.outputs.iter().find(|o| &o.filename == name) {
                Some(o) => chosen.push(o.clone()),
                None => {
                    let known: Vec<&str> = found.outputs.iter().map(|o| o.filename.as_str()).collect();
                    return Err(CliError::Usage(format!(
                        "job {job} has no output {name:?}; it has: {}",
                        if known.is_empty() { "(no outputs yet)".to_string() } else { known.join(", ") }
                    )));
                }
            }
        }
        chosen
    };
    save_all(&clients, &job, &outputs, &out, printer).await?;
    Ok(Exit::Success)
}

async fn workflows(args: WorkflowsArgs) -> Result<Exit, CliError> {
    let WorkflowsArgs { name, connect } = args;
    let clients = Clients::connect(&connect).await?;
    let printer = Printer { json: connect.json };
    let list = match name {
        Some(name) => {
            let get = pb::GetWorkflowRequest { name };
            vec![
                clients
                    .call("GetWorkflow", get, |mut c, r| async move { c.workflows.get_workflow(r).await })
                    .await?,
            ]
        }
        None => {
            let list = pb::ListWorkflowsRequest {};
            clients
                .call("ListWorkflows", list, |mut c, r| async move { c.workflows.list_workflows(r).await })
                .await?
                .workflows
        }
    };
    for w in &list {
        printer.result(&json::workflow(w), || describe_workflow(w));
    }
    Ok(Exit::Success)
}

fn describe_workflow(w: &pb::Workflow) -> String {
    let mut lines = vec![format!("{} {}: {}", w.name, w.version, w.description)];
    for i in &w.inputs {
        let kind = json::input_type_name(i.r#type);
        let how = match i.name.as_str() {
            "image" => "IMAGE (positional)".to_string(),
            "prompt" => "--prompt TEXT".to_string(),
            name => format!("--param {name}={}", kind.to_ascii_uppercase()),
        };
        let mut extra = Vec::new();
        if i.required {
            extra.push("required".to_string());
        }
        match (i.min, i.max) {
            (Some(min), Some(max)) => extra.push(format!("{min}..{max}")),
            (Some(min), None) => extra.push(format!(">= {min}")),
            (None, Some(max)) => extra.push(format!("<= {max}")),
            (None, None) => {}
        }
        if !i.choices.is_empty() {
            extra.push(i.choices.join("|"));
        }
        let extra = if extra.is_empty() { String::new() } else { format!(" [{}]", extra.join(", ")) };
        lines.push(format!("  {how}{extra}  {}", i.description));
    }
    lines.join("\n")
}

async fn machines(args: MachinesArgs) -> Result<Exit, CliError> {
    let MachinesArgs { all, connect } = args;
    let clients = Clients::connect(&connect).await?;
    let printer = Printer { json: connect.json };
    let mut page_token = String::new();
    if !printer.json {
        println!("{:<36}  {:<9}  {:<10}  {:>7}  {:>6}  url", "machine", "kind", "state", "running", "queued");
    }
    loop {
        let request = pb::ListMachinesRequest { page_size: 100, page_token, include_stopped: all };
        let page = clients
            .call("ListMachines", request, |mut c, r| async move { c.machines.list_machines(r).await })
            .await?;
        for m in &page.machines {
            let v = json::machine(m);
            printer.result(&v, || {
                format!(
                    "{:<36}  {:<9}  {:<10}  {:>7}  {:>6}  {}",
                    m.id,
                    v["kind"].as_str().unwrap_or(""),
                    v["state"].as_str().unwrap_or(""),
                    m.running_jobs,
                    m.queued_jobs,
                    m.comfy_url
                )
            });
        }
        if page.next_page_token.is_empty() || page.machines.is_empty() {
            return Ok(Exit::Success);
        }
        page_token = page.next_page_token;
    }
}

/// A server-given file name reduced to one safe path component.
fn safe_name(filename: &str) -> Result<&str, CliError> {
    let name = filename.rsplit(['/', '\\']).next().unwrap_or("");
    if name.is_empty() || name == "." || name == ".." {
        return Err(CliError::Protocol(format!("output file name {filename:?} is not a file name")));
    }
    Ok(name)
}

/// Saves each output in `dir`: inline bytes when the server sent them, `DownloadOutput` otherwise;
/// checks size and SHA-256, writes to a temporary file and renames it into place.
async fn save_all(
    clients: &Clients,
    job_id: &str,
    outputs: &[pb::Output],
    dir: &Path,
    printer: Printer,
) -> Result<(), CliError> {
    std::fs::create_dir_all(dir)
        .map_err(|source| CliError::Io { what: format!("creating {}", dir.display()), source })?;
    for output in outputs {
        let path = dir.join(safe_name(&output.filename)?);
        save_one(clients, job_id, output, &path).await?;
        let mut v =
            serde_json::json!({ "type": "saved", "job_id": job_id, "path": path.display().to_string() });
        if let (Some(v), serde_json::Value::Object(fields)) = (v.as_object_mut(), json::output(output)) {
            v.extend(fields);
        }
        printer.result(&v, || {
            format!(
                "saved {} ({}, {} bytes, {}x{})",
                path.display(),
                output.mime_type,
                output.size_bytes,
                output.width,
                output.height
            )
        });
    }
    Ok(())
}

async fn save_one(clients: &Clients, job_id: &str, output: &pb::Output, path: &Path) -> Result<(), CliError> {
    // Written next to its final name, then renamed: a reader never sees half a file.
    let part = path.with_file_name(format!(
        ".{}.part",
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    ));
    let result = write_checked(clients, job_id, output, &part).await.and_then(|()| {
        std::fs::rename(&part, path)
            .map_err(|source| CliError::Io { what: format!("saving {}", path.display()), source })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result
}

/// Writes the output's bytes to `path`, checking their size and SHA-256 against the server's. A download
/// cut midway (a restart, a replica going away) resumes at the byte it reached, under `--retry-for`.
async fn write_checked(
    clients: &Clients,
    job_id: &str,
    output: &pb::Output,
    path: &Path,
) -> Result<(), CliError> {
    let io = |source| CliError::Io { what: format!("writing {}", path.display()), source };
    let mut file = std::fs::File::create(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let mut write = |data: &[u8], written: &mut u64| -> Result<(), CliError> {
        hasher.update(data);
        *written += data.len() as u64;
        file.write_all(data).map_err(io)
    };
    if !output.inline_data.is_empty() && output.inline_data.len() as u64 == output.size_bytes {
        write(&output.inline_data, &mut written)?;
    } else {
        let mut retry = clients.retry("DownloadOutput");
        loop {
            let request = pb::DownloadOutputRequest {
                job_id: job_id.to_string(),
                filename: output.filename.clone(),
                chunk_size: 0,
                offset: written,
            };
            let cut = match clients.jobs.clone().download_output(request).await {
                Ok(response) => {
                    retry.answered();
                    let mut stream = response.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(chunk)) if chunk.offset != written => {
                                return Err(CliError::Protocol(format!(
                                    "{}: a chunk at byte {} where {written} was expected",
                                    output.filename, chunk.offset
                                )));
                            }
                            Ok(Some(chunk)) if written + chunk.data.len() as u64 > output.size_bytes => {
                                return Err(CliError::Protocol(format!(
                                    "{}: more than the {} bytes the server announced",
                                    output.filename, output.size_bytes
                                )));
                            }
                            Ok(Some(chunk)) => {
                                write(&chunk.data, &mut written)?;
                                retry.progressed();
                            }
                            Ok(None) if written >= output.size_bytes => break None,
                            Ok(None) => {
                                break Some(tonic::Status::unavailable(format!(
                                    "the download ended at byte {written} of {}",
                                    output.size_bytes
                                )));
                            }
                            Err(status) => break Some(status),
                        }
                    }
                }
                Err(status) => Some(status),
            };
            match cut {
                None => break,
                Some(status) => {
                    let resume = Resume::AtByte { filename: output.filename.clone(), offset: written };
                    retry.again(status, resume).await?;
                }
            }
        }
    }
    if written != output.size_bytes {
        return Err(CliError::Protocol(format!(
            "{}: received {written} bytes, the server announced {}",
            output.filename, output.size_bytes
        )));
    }
    let digest = hex::encode(hasher.finalize());
    if !output.sha256.is_empty() && digest != output.sha256 {
        return Err(CliError::Protocol(format!(
            "{}: SHA-256 {digest} differs from the server's {}",
            output.filename, output.sha256
        )));
    }
    file.sync_all().map_err(io)
}
