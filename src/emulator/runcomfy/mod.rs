//! An emulated RunComfy Server API: launch, status flow, auth, rate limits and billing, with faults. Each
//! launched machine is an emulated ComfyUI on its own port.
