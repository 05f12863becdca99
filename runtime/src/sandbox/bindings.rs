//! Host bindings for the `stepbox:step/step-core` world. The WASI CLI
//! interfaces come from wasmtime-wasi and are linked separately.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "stepbox:step/step-core",
    imports: { default: async | trappable },
    exports: { default: async },
    with: {
        "wasi:keyvalue/store.bucket": super::host::keyvalue::BucketHandle,
        "wasi:keyvalue/atomics.cas": super::host::keyvalue::CasHandle,
    },
});
