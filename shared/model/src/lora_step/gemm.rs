//! The matrix products, straight to `gemm` with strides: `dst (+)= s · a · b` with either
//! operand transposed, no copies for heads or transposes.

/// The one unsafe call of the crate: `gemm` takes raw pointers and strides.
///
/// `dst (+)= scale · lhs · rhs` for an `m×k` by `k×n` product, each matrix given by its data
/// and (row stride, column stride); `acc` adds to `dst` instead of overwriting it.
#[allow(clippy::too_many_arguments, unsafe_code)]
fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    acc: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    let end = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        end(m, n, dst_rs, 1) < dst.len(),
        "gemm: destination too short"
    );
    if k == 0 {
        if !acc {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    assert!(end(m, k, lhs_rs, lhs_cs) < lhs.len(), "gemm: lhs too short");
    assert!(end(k, n, rhs_rs, rhs_cs) < rhs.len(), "gemm: rhs too short");
    // SAFETY: every element the product reads or writes is inside the slices (checked above),
    // and `dst` is borrowed mutably, so it cannot alias `lhs` or `rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            acc,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `dst[m×n] (+)= s · a[m×k] · b[n×k]ᵀ` (row-major with leading dimensions).
#[allow(clippy::too_many_arguments)]
pub(super) fn a_bt(
    mnk: (usize, usize, usize),
    dst: &mut [f32],
    ldd: usize,
    acc: bool,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    s: f32,
) {
    gemm(mnk, dst, ldd, acc, a, (lda, 1), b, (1, ldb), s);
}

/// `dst[m×n] (+)= s · a[m×k] · b[k×n]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn a_b(
    mnk: (usize, usize, usize),
    dst: &mut [f32],
    ldd: usize,
    acc: bool,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    s: f32,
) {
    gemm(mnk, dst, ldd, acc, a, (lda, 1), b, (ldb, 1), s);
}

/// `dst[m×n] (+)= s · a[k×m]ᵀ · b[k×n]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn at_b(
    mnk: (usize, usize, usize),
    dst: &mut [f32],
    ldd: usize,
    acc: bool,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    s: f32,
) {
    gemm(mnk, dst, ldd, acc, a, (1, lda), b, (ldb, 1), s);
}
