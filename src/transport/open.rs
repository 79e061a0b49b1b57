//! Choosing and opening a transport: the only place that names the concrete ones. The engine
//! asks for its transport and, for peers on its own host, the socket one; it gets a [`Net`] back
//! and never learns which implementation answers.

use std::net::IpAddr;
use std::sync::Arc;

use super::plugin::PluginNet;
use super::socket::SocketNet;
use super::staged::{StagedNet, StagingParams};
use super::{Net, Wake};
use crate::config::{ChannelTransport, Config, TransportChoice};
use crate::error::Result;
use crate::sys::iface;

/// The transport `UCCL_TCPX_TRANSPORT` asks for, given GPU memory through staging where it moves
/// host memory only, and its kind (whose defaults the engine's channels take): auto falls back
/// from the plugin to sockets with a warning saying why; tcpx and tcpxo make a plugin failure an
/// engine-creation error. `ip` is the engine's address, `bind` what its listeners bind.
pub fn engine_net(config: &Config, ip: IpAddr, bind: IpAddr, wake: Wake) -> Result<(Arc<dyn Net>, ChannelTransport)> {
    let (selected, kind) = select(config, ip, bind, wake)?;
    Ok((StagedNet::wrap(selected, StagingParams::from_config(config))?, kind))
}

/// The socket transport, staged, for a plugin engine's peers on its own host (which the plugin
/// cannot reach).
pub fn local_peers_net(config: &Config, ip: IpAddr, bind: IpAddr, wake: Wake) -> Result<Arc<dyn Net>> {
    StagedNet::wrap(socket_net(config, ip, bind, wake)?, StagingParams::from_config(config))
}

fn select(config: &Config, ip: IpAddr, bind: IpAddr, wake: Wake) -> Result<(Arc<dyn Net>, ChannelTransport)> {
    let socket = || Ok((socket_net(config, ip, bind, wake.clone())?, ChannelTransport::Socket));
    let plugin = |net: PluginNet| (Arc::new(net) as Arc<dyn Net>, ChannelTransport::Plugin);
    // Channels pair with the devices next to the GPU once the engine names it (`Net::set_gpu`).
    let gpu_pci_path = None;
    match config.transport {
        TransportChoice::Socket => socket(),
        TransportChoice::Tcpx | TransportChoice::Tcpxo => match PluginNet::open(config, gpu_pci_path) {
            Ok(net) => Ok(plugin(net)),
            Err(e) => Err(e.context(format!("UCCL_TCPX_TRANSPORT={}", config.transport.name()))),
        },
        TransportChoice::Auto => match PluginNet::open(config, gpu_pci_path) {
            Ok(net) => Ok(plugin(net)),
            Err(e) => {
                log::warn!("using the built-in socket transport: {}", e.message());
                socket()
            }
        },
    }
}

/// The built-in socket transport with the engine's parameters: the engine's transport, or a plugin
/// engine's for peers on its own host. Its data links are looked up here, so an interface list
/// that names nothing fails the engine's creation.
fn socket_net(config: &Config, ip: IpAddr, bind: IpAddr, wake: Wake) -> Result<Arc<dyn Net>> {
    let net = SocketNet::new(ip, config.connect_timeout, config.timeout, wake)
        .with_options(config.socket.clone())
        .with_bind(bind);
    let Some(spec) = &config.socket.data_ifname else { return Ok(Arc::new(net)) };
    let links = iface::select(&iface::IfaceSpec::parse(spec).map_err(|e| e.context("UCCL_TCPX_SOCKET_IFNAME"))?)?;
    log::info!(
        "data sockets run over {}",
        links.iter().map(|(name, addr)| format!("{name} ({addr})")).collect::<Vec<_>>().join(", ")
    );
    Ok(Arc::new(net.with_data_links(links.into_iter().map(|(_, addr)| addr).collect())))
}
