//! An emulated ComfyUI server: the same routes, WebSocket messages, routing quirks and error shapes as the
//! real one, running a few model-free nodes on real pixels, with scriptable fault injection.
