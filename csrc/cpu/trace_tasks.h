// The per-task loops of the CPU trace passes (see trace_pass.h for what they compute).
//
// Included once per instruction set by cpu/trace_tasks_<isa>.cpp, each defining BP_CPU_ISA (the
// namespace of its copy) under its own `#pragma GCC target`; trace_pass_cpu.cpp picks one copy at
// run time. Nothing here may pull in inline code shared with other translation units (no ATen,
// no <algorithm>): the linker could otherwise keep an AVX-512 copy of it for every caller.
//
// A task is (batch chunk, column tile). Inside a task the loop order is i (pre-synaptic row),
// then b, then the tile's columns j: the rows of w and alpha are loaded once per i and reused over
// the chunk, and the innermost loop runs over contiguous columns so the compiler vectorises it.
#if !defined(BP_CPU_ISA) || !defined(BP_VECTOR_BYTES)
#error "define BP_CPU_ISA and BP_VECTOR_BYTES before including trace_tasks.h"
#endif

#include "../dispatch.h"
#include "../trace_pass.h"

namespace bp {
namespace BP_CPU_ISA {
namespace {

template <typename T>
BP_HOST_DEVICE void fill_zero(T* dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = T(0);
}

// Values per vector register: the width of the partial sums of row reductions.
template <typename T>
constexpr int kLanes = BP_VECTOR_BYTES / sizeof(T);

// Pairwise sum of the kLanes partial sums (a fixed order: results stay reproducible).
template <typename T>
BP_HOST_DEVICE T sum_lanes(T* lanes) {
  for (int width = kLanes<T> / 2; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
}

template <typename T>
BP_HOST_DEVICE void copy_n(const T* src, int64_t n, T* dst) {
  for (int64_t k = 0; k < n; ++k) dst[k] = src[k];
}

// Row of alpha seen by columns j0.. of pre-synaptic row i.
template <AlphaMode AM, typename T>
BP_HOST_DEVICE const T* alpha_row(const T* alpha, int64_t i, int64_t N, int64_t j0) {
  if constexpr (AM == AlphaMode::Full) return alpha + i * N + j0;
  if constexpr (AM == AlphaMode::Neuron) return alpha + j0;
  return alpha;
}

template <AlphaMode AM, typename T>
BP_HOST_DEVICE T alpha_at(const T* row, int64_t j) {
  if constexpr (AM == AlphaMode::Scalar) return row[0];
  return row[j];
}

template <EtaMode EM, typename T>
BP_HOST_DEVICE const T* eta_row(const T* eta, int64_t b, int64_t i, int64_t N, int64_t j0) {
  return EM == EtaMode::PerPost ? eta + b * N + j0 : eta + i * N + j0;
}

struct TaskRange {
  int64_t b0, b1, j0, nj;
};

BP_HOST_DEVICE TaskRange task_range(const Tiling& tl, int64_t B, int64_t N, int64_t task) {
  const int64_t chunk = task / tl.num_tiles, tile = task % tl.num_tiles;
  const int64_t b0 = chunk * tl.chunk_size, j0 = tile * tl.tile_cols;
  return {b0, b0 + tl.chunk_size < B ? b0 + tl.chunk_size : B, j0,
          tl.tile_cols < N - j0 ? tl.tile_cols : N - j0};
}

// Rows of the trace a forward sweep handles together: the per-(b, j) values (post, a per-post
// rate, the matvec accumulator) are loaded and stored once per block of rows instead of per row.
constexpr int64_t kForwardRows = 4;

// Rows i0 .. i0 + ROWS - 1 of sample b, columns [0, nj) of the task's tile.
template <int64_t ROWS, typename T, Rule R, AlphaMode AM, EtaMode EM, bool UPDATE, bool MATVEC>
BP_HOST_DEVICE void forward_rows(const ForwardPassParams<T>& p, const TaskRange& r,
                                 const RuleConsts<T>& consts, int64_t i0, int64_t b, T* acc_b) {
  const int64_t P = p.P, N = p.N;
  const T* hebb[ROWS];
  T* hebb_out[ROWS];
  const T* elig[ROWS];
  T* elig_out[ROWS];
  const T* w_row[ROWS];
  const T* a_row[ROWS];
  const T* eta[ROWS];
  T pre[ROWS], x[ROWS];
  for (int64_t k = 0; k < ROWS; ++k) {
    const int64_t i = i0 + k, off = (b * P + i) * N + r.j0;
    hebb[k] = p.hebb + off;
    // Without an eligibility trace the rule ignores `elig`; pointing it at hebb keeps the loop
    // branch-free.
    hebb_out[k] = UPDATE ? p.hebb_out + off : nullptr;
    elig[k] = UPDATE && has_elig<R>() ? p.elig + off : hebb[k];
    elig_out[k] = UPDATE && has_elig<R>() ? p.elig_out + off : nullptr;
    w_row[k] = MATVEC ? p.w + i * N + r.j0 : nullptr;
    a_row[k] = MATVEC ? alpha_row<AM>(p.alpha, i, N, r.j0) : nullptr;
    eta[k] = UPDATE ? eta_row<EM>(p.eta, b, i, N, r.j0) : nullptr;
    pre[k] = UPDATE ? p.pre[b * P + i] : T(0);
    x[k] = MATVEC ? p.matvec_in[b * P + i] : T(0);
  }
  const T* post = UPDATE ? p.post + b * N + r.j0 : nullptr;
#pragma omp simd
  for (int64_t j = 0; j < r.nj; ++j) {
    T acc = MATVEC ? acc_b[j] : T(0);
    const T post_j = UPDATE ? post[j] : T(0);
    // A per-post rate is the same for every row: one load.
    const T eta_post = UPDATE && EM == EtaMode::PerPost ? eta[0][j] : T(0);
#pragma GCC unroll 8
    for (int64_t k = 0; k < ROWS; ++k) {
      T h = hebb[k][j];
      if constexpr (UPDATE) {
        T e_new;
        rule_forward<R>(hebb[k][j], elig[k][j], pre[k], post_j,
                        EM == EtaMode::PerPost ? eta_post : eta[k][j], consts, h, e_new);
        hebb_out[k][j] = h;
        if constexpr (has_elig<R>()) elig_out[k][j] = e_new;
      }
      if constexpr (MATVEC) acc += x[k] * (w_row[k][j] + alpha_at<AM>(a_row[k], j) * h);
    }
    if constexpr (MATVEC) acc_b[j] = acc;
  }
}

template <typename T, Rule R, AlphaMode AM, EtaMode EM, bool UPDATE, bool MATVEC>
void forward_task(const ForwardPassParams<T>& p, const TaskRange& r, T* acc, int64_t tile_cols) {
  const int64_t P = p.P;
  // A local copy: the compiler cannot keep p.consts in a register across the stores to the
  // trace, which might alias it.
  const RuleConsts<T> consts = p.consts;
  if constexpr (MATVEC) fill_zero(acc, (r.b1 - r.b0) * tile_cols);
  // Row blocks outside, samples inside: a block's rows of w and alpha are reused over the chunk.
  // The accumulator still adds the rows in order, so results do not depend on the blocking.
  int64_t i0 = 0;
  for (; i0 + kForwardRows <= P; i0 += kForwardRows)
    for (int64_t b = r.b0; b < r.b1; ++b)
      forward_rows<kForwardRows, T, R, AM, EM, UPDATE, MATVEC>(p, r, consts, i0, b,
                                                               acc + (b - r.b0) * tile_cols);
  for (; i0 < P; ++i0)
    for (int64_t b = r.b0; b < r.b1; ++b)
      forward_rows<1, T, R, AM, EM, UPDATE, MATVEC>(p, r, consts, i0, b,
                                                    acc + (b - r.b0) * tile_cols);
  if constexpr (MATVEC) {
    for (int64_t b = r.b0; b < r.b1; ++b)
      copy_n(acc + (b - r.b0) * tile_cols, r.nj, p.u + b * p.N + r.j0);
  }
}

// Rows the backward sweep handles together, for the same reason as kForwardRows (fewer, as each
// row keeps several vectors of row sums in registers).
constexpr int64_t kBackwardRows = 2;

// What a backward sweep accumulates per task beyond the per-(b, j) scratch.
template <typename T>
struct TaskSums {
  T g_alpha_scalar = 0, g_rate = 0;
};

// Rows i0 .. i0 + ROWS - 1 of sample b: part B (matvec adjoint, step t) then part A (rule
// adjoint, step s) on each element.
template <int64_t ROWS, typename T, Rule R, AlphaMode AM, EtaMode EM, bool DO_B, bool DO_A>
BP_HOST_DEVICE void backward_rows(const BackwardPassParams<T>& p, const TaskRange& r,
                                  const RuleConsts<T>& consts, int64_t chunk, int64_t tile,
                                  int64_t i0, int64_t b, T* g_post_b, T* g_eta_b,
                                  T* g_alpha_row_acc, TaskSums<T>& sums) {
  const int64_t B = p.B, P = p.P, N = p.N;
  T* g_hebb[ROWS];
  T* g_elig[ROWS];
  T* g_alpha_full[ROWS];
  T* g_eta_conn[ROWS];
  const T* hebb_b[ROWS];
  const T* w_row[ROWS];
  const T* a_row[ROWS];
  const T* hebb_a[ROWS];
  const T* elig_a[ROWS];
  const T* eta[ROWS];
  T x[ROWS], pre[ROWS];
  for (int64_t k = 0; k < ROWS; ++k) {
    const int64_t i = i0 + k, off = (b * P + i) * N + r.j0;
    g_hebb[k] = p.g_hebb + off;
    hebb_b[k] = DO_B ? p.b_hebb + off : nullptr;
    w_row[k] = DO_B ? p.w + i * N + r.j0 : nullptr;
    a_row[k] = DO_B ? alpha_row<AM>(p.alpha, i, N, r.j0) : nullptr;
    g_alpha_full[k] = DO_B && AM == AlphaMode::Full ? p.g_alpha_acc + (chunk * P + i) * N + r.j0
                                                    : nullptr;
    x[k] = DO_B ? p.b_in[b * P + i] : T(0);
    hebb_a[k] = DO_A ? p.a_hebb + off : nullptr;
    elig_a[k] = DO_A && has_elig<R>() ? p.a_elig + off : hebb_a[k];
    g_elig[k] = DO_A && has_elig<R>() ? p.g_elig + off : nullptr;
    eta[k] = DO_A ? eta_row<EM>(p.a_eta, b, i, N, r.j0) : nullptr;
    g_eta_conn[k] = DO_A && EM == EtaMode::PerConnection ? p.g_eta + (chunk * P + i) * N + r.j0
                                                         : nullptr;
    pre[k] = DO_A ? p.a_pre[b * P + i] : T(0);
  }
  const T* g_u = DO_B ? p.g_u + b * N + r.j0 : nullptr;
  const T* post = DO_A ? p.a_post + b * N + r.j0 : nullptr;
  // Column j of every row: g_post and a per-post rate's gradient accumulate in registers over the
  // rows (in row order, as one row at a time would) and are loaded and stored once.
  auto column = [&](int64_t j, T* g_x, T* g_a, T* g_pre, T* g_r) {
    const T gu = DO_B ? g_u[j] : T(0);
    const T post_j = DO_A ? post[j] : T(0);
    const T eta_post = DO_A && EM == EtaMode::PerPost ? eta[0][j] : T(0);
    T gp = DO_A ? g_post_b[j] : T(0);
    T ge = DO_A && EM == EtaMode::PerPost ? g_eta_b[j] : T(0);
#pragma GCC unroll 8
    for (int64_t k = 0; k < ROWS; ++k) {
      T g = g_hebb[k][j];
      if constexpr (DO_B) {
        const T a = alpha_at<AM>(a_row[k], j);
        g_x[k] += gu * (w_row[k][j] + a * hebb_b[k][j]);
        const T g_aij = gu * x[k] * hebb_b[k][j];
        if constexpr (AM == AlphaMode::Full) g_alpha_full[k][j] += g_aij;
        if constexpr (AM == AlphaMode::Neuron) g_alpha_row_acc[j] += g_aij;
        if constexpr (AM == AlphaMode::Scalar) g_a[k] += g_aij;
        g += gu * x[k] * a;
      }
      if constexpr (DO_A) {
        const T g_elig_out = has_elig<R>() ? g_elig[k][j] : T(0);
        const RuleGrads<T> rg = rule_backward<R>(
            g, g_elig_out, hebb_a[k][j], elig_a[k][j], pre[k], post_j,
            EM == EtaMode::PerPost ? eta_post : eta[k][j], consts);
        g = rg.hebb;
        if constexpr (has_elig<R>()) {
          g_elig[k][j] = rg.elig;
          g_r[k] += rg.elig_rate;
        }
        gp += rg.post;
        if constexpr (EM == EtaMode::PerPost) ge += rg.eta;
        else g_eta_conn[k][j] += rg.eta;
        g_pre[k] += rg.pre;
      }
      g_hebb[k][j] = g;
    }
    if constexpr (DO_A) {
      g_post_b[j] = gp;
      if constexpr (EM == EtaMode::PerPost) g_eta_b[j] = ge;
    }
  };
  // The row sums keep kLanes partial sums per row, one per vector lane, added pairwise at the
  // end: the vectoriser would otherwise add the lanes one after the other, for every row.
  constexpr int L = kLanes<T>;
  T lx[ROWS * L] = {}, la[ROWS * L] = {}, lp[ROWS * L] = {}, lr[ROWS * L] = {};
  int64_t j = 0;
  for (; j + L <= r.nj; j += L) {
#pragma omp simd
    for (int l = 0; l < L; ++l) {
      // Row k's lane l lives at k * L + l: each row's partial sums are contiguous.
      T gx[ROWS], ga[ROWS], gpre[ROWS], gr[ROWS];
      for (int64_t k = 0; k < ROWS; ++k) {
        gx[k] = lx[k * L + l]; ga[k] = la[k * L + l]; gpre[k] = lp[k * L + l]; gr[k] = lr[k * L + l];
      }
      column(j + l, gx, ga, gpre, gr);
      for (int64_t k = 0; k < ROWS; ++k) {
        lx[k * L + l] = gx[k]; la[k * L + l] = ga[k]; lp[k * L + l] = gpre[k]; lr[k * L + l] = gr[k];
      }
    }
  }
  T rx[ROWS] = {}, ra[ROWS] = {}, rp[ROWS] = {}, rr[ROWS] = {};  // the columns left over
  for (; j < r.nj; ++j) column(j, rx, ra, rp, rr);
  for (int64_t k = 0; k < ROWS; ++k) {
    const int64_t i = i0 + k;
    if constexpr (DO_B) {
      p.g_in_partial[(tile * B + b) * P + i] = sum_lanes(lx + k * L) + rx[k];
      if constexpr (AM == AlphaMode::Scalar) sums.g_alpha_scalar += sum_lanes(la + k * L) + ra[k];
    }
    if constexpr (DO_A) {
      p.g_pre_partial[(tile * B + b) * P + i] = sum_lanes(lp + k * L) + rp[k];
      if constexpr (has_elig<R>()) sums.g_rate += sum_lanes(lr + k * L) + rr[k];
    }
  }
}

template <typename T, Rule R, AlphaMode AM, EtaMode EM, bool DO_B, bool DO_A>
void backward_task(const BackwardPassParams<T>& p, const Tiling& tl, const TaskRange& r,
                   int64_t task, T* scratch) {
  const int64_t P = p.P, N = p.N, tc = tl.tile_cols;
  const RuleConsts<T> consts = p.consts;  // in a register, see forward_task
  const int64_t chunk = task / tl.num_tiles, tile = task % tl.num_tiles;
  const int64_t rows = (r.b1 - r.b0) * tc;
  T* g_post_acc = scratch;        // per (b, j), summed over i
  T* g_eta_acc = scratch + rows;  // per (b, j), summed over i (EtaMode::PerPost)
  if constexpr (DO_A) fill_zero(scratch, 2 * rows);
  TaskSums<T> sums;
  T* g_alpha_row_acc = nullptr;   // AlphaMode::Neuron: this chunk's (N,) accumulator
  if constexpr (DO_B && AM == AlphaMode::Neuron) g_alpha_row_acc = p.g_alpha_acc + chunk * N + r.j0;
  auto rows_of = [&]<int64_t ROWS>(int64_t i0) {
    for (int64_t b = r.b0; b < r.b1; ++b)
      backward_rows<ROWS, T, R, AM, EM, DO_B, DO_A>(p, r, consts, chunk, tile, i0, b,
                                                    g_post_acc + (b - r.b0) * tc,
                                                    g_eta_acc + (b - r.b0) * tc,
                                                    g_alpha_row_acc, sums);
  };
  int64_t i0 = 0;
  for (; i0 + kBackwardRows <= P; i0 += kBackwardRows) rows_of.template operator()<kBackwardRows>(i0);
  for (; i0 < P; ++i0) rows_of.template operator()<1>(i0);
  if constexpr (DO_B && AM == AlphaMode::Scalar) p.g_alpha_acc[task] += sums.g_alpha_scalar;
  if constexpr (DO_A) {
    if constexpr (has_elig<R>()) p.g_elig_rate_acc[task] += sums.g_rate;
    for (int64_t b = r.b0; b < r.b1; ++b) {
      copy_n(g_post_acc + (b - r.b0) * tc, r.nj, p.g_post + b * N + r.j0);
      if constexpr (EM == EtaMode::PerPost)
        copy_n(g_eta_acc + (b - r.b0) * tc, r.nj, p.g_eta + b * N + r.j0);
    }
  }
}

}  // namespace

// Runs tasks [begin, end) of a forward pass; scratch holds chunk_size * tile_cols values.
template <typename T>
void forward_tasks(const ForwardPassParams<T>& p, const PassModes& modes, const Tiling& tl,
                   int64_t begin, int64_t end, T* scratch) {
  dispatch_modes(modes, [&]<Rule R, AlphaMode AM, EtaMode EM>() {
    auto run = [&](auto task_fn) {
      for (int64_t t = begin; t < end; ++t)
        task_fn(p, task_range(tl, p.B, p.N, t), scratch, tl.tile_cols);
    };
    if (p.update && p.matvec) run(forward_task<T, R, AM, EM, true, true>);
    else if (p.update) run(forward_task<T, R, AM, EM, true, false>);
    else if (p.matvec) run(forward_task<T, R, AM, EM, false, true>);
  });
}

// Runs tasks [begin, end) of a backward pass; scratch holds 2 * chunk_size * tile_cols values.
template <typename T>
void backward_tasks(const BackwardPassParams<T>& p, const PassModes& modes, const Tiling& tl,
                    int64_t begin, int64_t end, T* scratch) {
  dispatch_modes(modes, [&]<Rule R, AlphaMode AM, EtaMode EM>() {
    auto run = [&](auto task_fn) {
      for (int64_t t = begin; t < end; ++t)
        task_fn(p, tl, task_range(tl, p.B, p.N, t), t, scratch);
    };
    if (p.do_b && p.do_a) run(backward_task<T, R, AM, EM, true, true>);
    else if (p.do_b) run(backward_task<T, R, AM, EM, true, false>);
    else if (p.do_a) run(backward_task<T, R, AM, EM, false, true>);
  });
}

template void forward_tasks<float>(const ForwardPassParams<float>&, const PassModes&,
                                   const Tiling&, int64_t, int64_t, float*);
template void forward_tasks<double>(const ForwardPassParams<double>&, const PassModes&,
                                    const Tiling&, int64_t, int64_t, double*);
template void backward_tasks<float>(const BackwardPassParams<float>&, const PassModes&,
                                    const Tiling&, int64_t, int64_t, float*);
template void backward_tasks<double>(const BackwardPassParams<double>&, const PassModes&,
                                     const Tiling&, int64_t, int64_t, double*);

}  // namespace BP_CPU_ISA
}  // namespace bp
