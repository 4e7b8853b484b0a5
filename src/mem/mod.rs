//! Host memory: anonymous mappings bound to NUMA nodes before first touch.

mod buffer;
pub mod numa;

pub use buffer::{round_up_to_page, HostBuffer};
pub use numa::{NodePlacement, PAGE_SIZE};
