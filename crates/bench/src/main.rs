//! `uccl-tcpx-bench`: transfer benchmark over the built-in socket transport, host or GPU memory
//! (`--device gpu`), between two processes (`--loopback`, the default, starts the server end as a child of itself) or two hosts
//! (`--role server` / `--role client`), with raw TCP baselines measured in the same run.

mod anchor;
mod args;
mod client;
mod cpus;
mod ctl;
mod host_buffer;
mod layout;
mod memory;
mod parallel_copy;
mod plot;
mod probe;
mod progress;
mod raw;
mod report;
mod rounds;
mod same_host;
mod scale;
mod server;
mod stdout;
mod transport_ping;

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::process::{Command, Stdio};

use args::{Args, Role};
use stdout::{say, sayln};

fn fail(msg: &str) -> ! {
    eprintln!("uccl-tcpx-bench: {msg}");
    std::process::exit(1)
}

fn main() {
    // Usage errors print as clap's and exit with 2; failures of the run itself exit with 1.
    let mut args = Args::try_from_args(std::env::args_os()).unwrap_or_else(|e| e.exit());
    // Before anything starts a thread: later threads inherit the set.
    let split = place(&args).unwrap_or_else(|e| fail(&e));
    // Checked before any process or connection exists, so a host without CUDA gets one clear line.
    let peer_gpu = memory::resolve_gpus(&args).unwrap_or_else(|e| fail(&e));
    if args.role == Role::Loopback {
        args.peer_gpu = peer_gpu;
    }
    match args.role {
        Role::Server => server::run(&args).unwrap_or_else(|e| fail(&format!("server: {e}"))),
        Role::Client => {
            let ip = args.remote_ip.as_deref().unwrap_or_default();
            let ip: IpAddr = ip.parse().unwrap_or_else(|_| fail(&format!("--remote-ip {ip:?} is not an IP address")));
            client_and_report(&args, ip, args.port, &format!("client of {ip}"));
        }
        Role::Loopback => loopback(&args, split),
    }
}

/// Pins this process to `--cpus`; with `--split-cores`, to the second half of its CPUs, returning
/// both halves (the first is the server's).
fn place(args: &Args) -> Result<Option<cpus::Split>, String> {
    if let Some(cpus) = &args.cpus {
        cpus::pin(cpus)?;
    }
    if !args.split_cores {
        return Ok(None);
    }
    let split = cpus::halves(&cpus::allowed()?)?;
    cpus::pin(&split.client)?;
    Ok(Some(split))
}

/// Starts the server end as a child process (on `split.server` if given, this process already
/// running on `split.client`), reads the port it chose, and runs the client here.
fn loopback(args: &Args, split: Option<cpus::Split>) {
    let exe = std::env::current_exe().unwrap_or_else(|e| fail(&format!("cannot find this executable: {e}")));
    let mut child_args = args.server_child_args();
    let mut mode = "loopback, 2 processes".to_string();
    if args.same_host {
        mode += ", same-host connection";
    }
    if args.huge_pages {
        let thp = memory::thp_mode().unwrap_or_else(|| "unknown".into());
        mode += &format!(", host buffers asked for transparent huge pages (kernel THP mode: {thp})");
    }
    if let Some(cpus::Split { server, client }) = &split {
        child_args.extend(["--cpus".into(), cpus::format(server)]);
        mode = format!("{mode}, server on CPUs {}, client on {}", cpus::format(server), cpus::format(client));
    }
    let mut child = Command::new(exe)
        .args(child_args)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| fail(&format!("cannot start the server process: {e}")));
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped stdout");
    let _ = BufReader::new(stdout).read_line(&mut line);
    let port = line.strip_prefix("LISTENING ").and_then(|p| p.trim().parse::<u16>().ok());
    let Some(port) = port else {
        let _ = child.kill();
        fail(&format!("the server process did not announce its port (said {line:?})"));
    };
    client_and_report(args, "127.0.0.1".parse().unwrap(), port, &mode);
    match child.wait() {
        Ok(s) if s.success() => {}
        Ok(s) => fail(&format!("the server process ended with {s}")),
        Err(e) => fail(&format!("waiting for the server process: {e}")),
    }
}

fn client_and_report(args: &Args, ip: IpAddr, port: u16, mode: &str) {
    if !args.scale.is_empty() {
        scale::run(args, ip, port).unwrap_or_else(|e| fail(&format!("scale: {e}")));
        return;
    }
    let mut printed_header = false;
    let (info, points) = client::run(args, ip, port, &mut |info, p, progress| {
        if args.json {
            return;
        }
        progress.clear();
        if !printed_header {
            sayln!("{}", report::header(info, mode));
            printed_header = true;
        }
        sayln!("{}", report::line(p));
        if let Some(rounds) = report::rounds_line(p) {
            sayln!("{rounds}");
        }
        progress.redraw();
    })
    .unwrap_or_else(|e| fail(&format!("client: {e}")));
    let json =
        report::json(&info, mode, &points).unwrap_or_else(|e| fail(&format!("cannot write the JSON report: {e}")));
    if let Some(path) = &args.json_file {
        std::fs::write(path, format!("{json}\n"))
            .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", path.display())));
    }
    if args.json {
        sayln!("{json}");
    } else {
        say(format_args!("{}", report::summary(&points)));
        sayln!("{}", report::checked_line(&info));
    }
    if let Some(path) = &args.plot {
        let title = format!("uccl-tcpx socket transport, {mode}: GB/s by message size");
        plot::draw(path, &title, &points).unwrap_or_else(|e| fail(&e));
        if !args.json {
            sayln!("# chart written to {}", path.display());
        }
    }
}
