use crate::ffi::vf_tensor;
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct vf_dist_group {
    _unused: [u8; 0],
}
#[repr(C)]
#[derive(Debug, Copy, Clone)]
pub struct vf_dist_reducer {
    _unused: [u8; 0],
}
unsafe extern "C" {
    pub fn vf_dist_backends() -> u32;
    pub fn vf_dist_group_new(
        backend: i32,
        host: *const ::std::os::raw::c_char,
        port: u16,
        rank: i32,
        world: i32,
        agent_store: i32,
        device_index: i32,
        timeout_ms: i64,
        out: *mut *mut vf_dist_group,
    ) -> *mut ::std::os::raw::c_char;
    pub fn vf_dist_group_free(group: *mut vf_dist_group);
    pub fn vf_dist_all_reduce(
        group: *mut vf_dist_group,
        tensor: *mut vf_tensor,
        op: i32,
    ) -> *mut ::std::os::raw::c_char;
    pub fn vf_dist_broadcast(
        group: *mut vf_dist_group,
        tensors: *const *mut vf_tensor,
        n: usize,
        root: i32,
    ) -> *mut ::std::os::raw::c_char;
    pub fn vf_dist_barrier(group: *mut vf_dist_group) -> *mut ::std::os::raw::c_char;
    pub fn vf_dist_reducer_new(
        group: *mut vf_dist_group,
        params: *const *mut vf_tensor,
        n: usize,
        bucket_bytes: i64,
        first_bucket_bytes: i64,
        find_unused: i32,
        out: *mut *mut vf_dist_reducer,
    ) -> *mut ::std::os::raw::c_char;
    pub fn vf_dist_reducer_prepare_forward(
        reducer: *mut vf_dist_reducer,
    ) -> *mut ::std::os::raw::c_char;
    pub fn vf_dist_reducer_prepare_backward(
        reducer: *mut vf_dist_reducer,
        outputs: *const *mut vf_tensor,
        n: usize,
    ) -> *mut ::std::os::raw::c_char;
    pub fn vf_dist_reducer_buckets(
        reducer: *mut vf_dist_reducer,
        bucket_of: *mut i64,
        n: usize,
        n_buckets: *mut usize,
    ) -> *mut ::std::os::raw::c_char;
    pub fn vf_dist_reducer_free(reducer: *mut vf_dist_reducer);
}
