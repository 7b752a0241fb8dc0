//! The plugin engine: one wasmtime engine per process with an epoch
//! ticker for time limits, the host functions a plugin may import, and the
//! validation and compilation of an uploaded component.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::Engine;
use wasmtime::component::{
    Component, HasSelf, Linker, Resource, ResourceAny, ResourceType, Val, types::ComponentItem,
};

use super::call::{CompiledPlugin, HookIndices};
use super::instance::{EpochClock, PluginState};
use super::limits::MAX_LOG_LINE_BYTES;
use super::{
    CallSettings, Hook, InvalidPlugin, Plugin, WIT_PACKAGE, hex_sha256, short, speaks_our_wit,
};

/// Imports a plugin may have besides `pushgate:plugin/host`: what Rust's
/// standard library links on `wasm32-wasip2` for printing, panic messages
/// and exit. What printing needs is served (see [`define_stdio`]): lines
/// written to stdout or stderr — a panic's message among them — go to the
/// node's log as the plugin's, within its log budget; an empty environment,
/// no arguments, no terminal. Any other function of these interfaces stops
/// the call with a clear error.
const TOLERATED_IMPORTS: &[&str] = &[
    "wasi:cli/environment@",
    "wasi:cli/exit@",
    "wasi:cli/stdin@",
    "wasi:cli/stdout@",
    "wasi:cli/stderr@",
    "wasi:cli/terminal-input@",
    "wasi:cli/terminal-output@",
    "wasi:cli/terminal-stdin@",
    "wasi:cli/terminal-stdout@",
    "wasi:cli/terminal-stderr@",
    "wasi:io/error@",
    "wasi:io/streams@",
    "wasi:io/poll@",
];

/// The process's plugin engine. Cheap to clone.
#[derive(Clone)]
pub struct PluginHost {
    clock: EpochClock,
    linker: Arc<Linker<PluginState>>,
}

impl PluginHost {
    /// Creates the engine and starts its epoch ticker: a plain thread, so
    /// that time limits hold however busy the async runtime is. It ticks
    /// every [`EPOCH_TICK`] while a call runs and sleeps otherwise.
    pub fn new() -> wasmtime::Result<Self> {
        Self::with_compiled_cache(None)
    }

    /// [`new`](Self::new), keeping compiled plugins in `dir` (wasmtime's
    /// own cache, keyed by the component, the engine's settings and
    /// wasmtime's version): a restart loads what it compiled before
    /// instead of compiling it again.
    pub fn with_compiled_cache(dir: Option<&std::path::Path>) -> wasmtime::Result<Self> {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        if let Some(dir) = dir {
            let mut cache = wasmtime::CacheConfig::new();
            // The cache takes absolute paths only.
            cache.with_directory(std::path::absolute(dir)?);
            config.cache(Some(wasmtime::Cache::new(cache)?));
        }
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        Plugin::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
        let clock = EpochClock::start(engine)?;
        Ok(Self {
            clock,
            linker: Arc::new(linker),
        })
    }

    /// Validates and compiles a component: it must be a component, import
    /// nothing beyond what plugins may use, and export at least one hook of
    /// this host's WIT version with the right types. Slow (milliseconds to
    /// seconds): run it off the async workers.
    pub fn compile(&self, tenant: &str, bytes: &[u8]) -> Result<CompiledPlugin, InvalidPlugin> {
        if is_core_module(bytes) {
            return Err(InvalidPlugin(
                "this is a core WebAssembly module, not a component: build for wasm32-wasip2 \
                 (or wrap it with `wasm-tools component new`)"
                    .to_owned(),
            ));
        }
        let component = Component::new(&self.clock.engine, bytes)
            .map_err(|err| InvalidPlugin(format!("not a valid WebAssembly component: {err:#}")))?;
        let component_type = component.component_type();
        let mut forbidden = Vec::new();
        for (name, item) in component_type.imports(&self.clock.engine) {
            // `types` only carries type definitions; `host` is what we offer.
            if speaks_our_wit(name, "host") || speaks_our_wit(name, "types") {
                continue;
            }
            let tolerated = TOLERATED_IMPORTS.iter().any(|p| name.starts_with(p));
            if !tolerated || !matches!(item.ty, ComponentItem::ComponentInstance(_)) {
                forbidden.push(name.to_owned());
            }
        }
        if !forbidden.is_empty() {
            return Err(InvalidPlugin(format!(
                "the component imports {}, which plugins may not use (no filesystem, network, \
                 clock or other system access: use pushgate:plugin/host)",
                forbidden.join(", ")
            )));
        }
        let mut linker = Linker::clone(&self.linker);
        define_tolerated_imports(&mut linker, &self.clock.engine, &component)
            .map_err(|err| InvalidPlugin(format!("cannot link the component: {err}")))?;
        let instance_pre = linker.instantiate_pre(&component).map_err(|err| {
            InvalidPlugin(format!(
                "the component's imports do not match {WIT_PACKAGE}: {err:#}"
            ))
        })?;
        let hooks: Vec<Hook> = Hook::ALL
            .into_iter()
            .filter(|hook| {
                component
                    .get_export_index(None, hook.export_name())
                    .is_some()
            })
            .collect();
        if hooks.is_empty() {
            let exports: Vec<String> = component_type
                .exports(&self.clock.engine)
                .map(|(name, _)| name.to_owned())
                .collect();
            return Err(InvalidPlugin(format!(
                "the component exports none of {WIT_PACKAGE}'s hooks (authenticate, on-publish, \
                 on-deliver); it exports {exports:?}. Build it against the WIT package in wit/"
            )));
        }
        let indices = HookIndices::new(&instance_pre, &hooks)?;
        let version = hex_sha256(bytes);
        let ok_metrics = Hook::ALL.map(|hook| {
            crate::metrics::PluginCallMetrics::new(tenant, short(&version), hook.name())
        });
        let plugin = CompiledPlugin::new(
            self.clock.clone(),
            tenant,
            version,
            bytes.len(),
            hooks,
            (instance_pre, indices),
            ok_metrics,
        );
        // Instantiating once checks every export's types now, not at the
        // first message.
        let settings = CallSettings {
            config: Arc::default(),
            max_memory_bytes: 64 << 20,
            timeout: Duration::from_secs(5),
            max_output_bytes: 64 << 10,
            canary: Default::default(),
            shadow: Default::default(),
        };
        // Not pooled: the first call makes its instance under the
        // tenant's own limits.
        let _ticking = self.clock.ticking();
        plugin.instantiate(&settings).map_err(|err| {
            InvalidPlugin(format!("the component cannot be instantiated: {err:#}"))
        })?;
        Ok(plugin)
    }
}

/// A plugin's standard output or error stream (`wasi:io/streams`'s
/// `output-stream`, as `wasi:cli/stdout` and `wasi:cli/stderr` hand it).
struct PrintStream;

/// What a print stream's `subscribe` hands back: always ready.
struct Ready;

/// Links each tolerated WASI interface the component imports: what printing
/// needs is served (see [`stdio`]), every other function stops the call
/// with a clear error. Only those interfaces: wasmtime's
/// `define_unknown_imports_as_traps` would also shadow, with traps, a
/// `pushgate:plugin/host` of an older 0.1.x that the linker serves by
/// semver from this host's version.
fn define_tolerated_imports(
    linker: &mut Linker<PluginState>,
    engine: &Engine,
    component: &Component,
) -> wasmtime::Result<()> {
    for (name, import) in component.component_type().imports(engine) {
        if !TOLERATED_IMPORTS.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let ComponentItem::ComponentInstance(interface) = import.ty else {
            continue;
        };
        let interface_name = name.split('@').next().unwrap_or(name);
        let mut instance = linker.instance(name)?;
        for (item, export) in interface.exports(engine) {
            match export.ty {
                ComponentItem::ComponentFunc(_) => match stdio(interface_name, item) {
                    Some(served) => {
                        instance.func_new(item, move |mut store, ty, params, results| {
                            // A host function given a borrowed handle ends the
                            // borrow itself.
                            for param in params {
                                end_borrows(&mut store, param)?;
                            }
                            served(store, ty, params, results)
                        })?
                    }
                    None => {
                        let called = format!("{name}#{item}");
                        instance.func_new(item, move |_, _, _, _| {
                            Err(wasmtime::format_err!(
                                "the plugin called `{called}`, which plugins cannot use \
                                 (printing goes to the node's log; nothing else of WASI is there)"
                            ))
                        })?;
                    }
                },
                ComponentItem::Resource(_) if item == "output-stream" => {
                    instance.resource(item, ResourceType::host::<PrintStream>(), |_, _| Ok(()))?;
                }
                ComponentItem::Resource(_) if item == "pollable" => {
                    instance.resource(item, ResourceType::host::<Ready>(), |_, _| Ok(()))?;
                }
                ComponentItem::Resource(_) => {
                    instance.resource(item, ResourceType::host::<()>(), |_, _| Ok(()))?;
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Ends the borrows of resources in `value` (a parameter).
fn end_borrows(
    store: &mut wasmtime::StoreContextMut<'_, PluginState>,
    value: &Val,
) -> wasmtime::Result<()> {
    match value {
        Val::Resource(resource) if !resource.owned() => resource.resource_drop(&mut *store),
        Val::List(items) => items.iter().try_for_each(|item| end_borrows(store, item)),
        _ => Ok(()),
    }
}

/// A host function of a dynamically typed WASI import.
type DynamicFunc = fn(
    wasmtime::StoreContextMut<'_, PluginState>,
    wasmtime::component::types::ComponentFunc,
    &[Val],
    &mut [Val],
) -> wasmtime::Result<()>;

/// What serves `function` of WASI `interface` for printing, if anything:
/// stdout and stderr are streams whose writes are kept and logged by line,
/// always ready for more; the environment and arguments are empty; there
/// is no terminal.
fn stdio(interface: &str, function: &str) -> Option<DynamicFunc> {
    let served: DynamicFunc = match (interface, function) {
        ("wasi:cli/stdout", "get-stdout") | ("wasi:cli/stderr", "get-stderr") => {
            |mut store, _, _, results| {
                let stream = Resource::<PrintStream>::new_own(0);
                results[0] = Val::Resource(ResourceAny::try_from_resource(stream, &mut store)?);
                Ok(())
            }
        }
        (
            "wasi:io/streams",
            "[method]output-stream.write" | "[method]output-stream.blocking-write-and-flush",
        ) => |mut store, _, params, results| {
            if let Some(Val::List(bytes)) = params.get(1) {
                store.data_mut().print(bytes.iter().map(|b| match b {
                    Val::U8(byte) => *byte,
                    _ => b'?',
                }));
            }
            results[0] = Val::Result(Ok(None));
            Ok(())
        },
        ("wasi:io/streams", "[method]output-stream.subscribe") => |mut store, _, _, results| {
            let ready = Resource::<Ready>::new_own(0);
            results[0] = Val::Resource(ResourceAny::try_from_resource(ready, &mut store)?);
            Ok(())
        },
        ("wasi:io/poll", "[method]pollable.block") => |_, _, _, _| Ok(()),
        ("wasi:io/poll", "[method]pollable.ready") => |_, _, _, results| {
            results[0] = Val::Bool(true);
            Ok(())
        },
        ("wasi:io/poll", "poll") => |_, _, params, results| {
            let count = match params.first() {
                Some(Val::List(pollables)) => pollables.len() as u32,
                _ => 0,
            };
            results[0] = Val::List((0..count).map(Val::U32).collect());
            Ok(())
        },
        ("wasi:io/streams", "[method]output-stream.check-write") => |_, _, _, results| {
            results[0] = Val::Result(Ok(Some(Box::new(Val::U64(MAX_LOG_LINE_BYTES as u64)))));
            Ok(())
        },
        (
            "wasi:io/streams",
            "[method]output-stream.flush" | "[method]output-stream.blocking-flush",
        ) => |_, _, _, results| {
            results[0] = Val::Result(Ok(None));
            Ok(())
        },
        ("wasi:cli/environment", "get-environment" | "get-arguments") => |_, _, _, results| {
            results[0] = Val::List(Vec::new());
            Ok(())
        },
        ("wasi:cli/environment", "initial-cwd")
        | ("wasi:cli/terminal-stdin", "get-terminal-stdin")
        | ("wasi:cli/terminal-stdout", "get-terminal-stdout")
        | ("wasi:cli/terminal-stderr", "get-terminal-stderr") => |_, _, _, results| {
            results[0] = Val::Option(None);
            Ok(())
        },
        _ => return None,
    };
    Some(served)
}

/// A core module starts with the magic and version 1; a component with the
/// magic and a component-model layer. Checking it gives a clearer error.
fn is_core_module(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[4..8] == [1, 0, 0, 0]
}
