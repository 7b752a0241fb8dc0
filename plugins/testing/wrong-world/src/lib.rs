//! A component of another world: it exports nothing pushgate knows.

use pushgate_plugin_sdk::wit_bindgen;

wit_bindgen::generate!({
    world: "greeter",
    path: "wit",
    runtime_path: "pushgate_plugin_sdk::wit_bindgen::rt",
});

struct Greeter;

impl exports::other::thing::greet::Guest for Greeter {
    fn hello(name: String) -> String {
        format!("hello {name}")
    }
}

export!(Greeter);
