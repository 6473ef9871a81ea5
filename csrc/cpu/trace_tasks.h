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

template <typename T, Rule R, AlphaMode AM, EtaMode EM, bool UPDATE, bool MATVEC>
void forward_task(const ForwardPassParams<T>& p, const TaskRange& r, T* acc, int64_t tile_cols) {
  const int64_t P = p.P, N = p.N;
  // A local copy: the compiler cannot keep the constants in a register across the stores to the
  // trace, which might alias them.
  const RuleConsts<T> consts = load_rule_consts<R>(p.rule_args);
  if constexpr (MATVEC) fill_zero(acc, (r.b1 - r.b0) * tile_cols);
  for (int64_t i = 0; i < P; ++i) {
    const T* w_row = MATVEC ? p.w + i * N + r.j0 : nullptr;
    const T* a_row = MATVEC ? alpha_row<AM>(p.alpha, i, N, r.j0) : nullptr;
    for (int64_t b = r.b0; b < r.b1; ++b) {
      const int64_t off = (b * P + i) * N + r.j0;
      const T* hebb = p.hebb + off;
      T* acc_b = acc + (b - r.b0) * tile_cols;
      const T x = MATVEC ? p.matvec_in[b * P + i] : T(0);
      if constexpr (UPDATE) {
        T* hebb_out = p.hebb_out + off;
        // Without an eligibility trace the rule ignores `elig`; pointing it at hebb keeps the
        // loop branch-free.
        const T* elig = has_elig<R>() ? p.elig + off : hebb;
        T* elig_out = has_elig<R>() ? p.elig_out + off : nullptr;
        const T pre = p.pre[b * P + i];
        const T* post = p.post + b * N + r.j0;
        const T* eta = eta_row<EM>(p.eta, b, i, N, r.j0);
#pragma omp simd
        for (int64_t j = 0; j < r.nj; ++j) {
          T h_new, e_new;
          rule_forward<R>(hebb[j], elig[j], pre, post[j], eta[j], consts, h_new, e_new);
          hebb_out[j] = h_new;
          if constexpr (has_elig<R>()) elig_out[j] = e_new;
          if constexpr (MATVEC)
            acc_b[j] += x * (w_row[j] + alpha_at<AM>(a_row, j) * trace_read<R>(h_new, consts));
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < r.nj; ++j)
          acc_b[j] += x * (w_row[j] + alpha_at<AM>(a_row, j) * trace_read<R>(hebb[j], consts));
      }
    }
  }
  if constexpr (MATVEC) {
    for (int64_t b = r.b0; b < r.b1; ++b)
      copy_n(acc + (b - r.b0) * tile_cols, r.nj, p.u + b * N + r.j0);
  }
}

template <typename T, Rule R, AlphaMode AM, EtaMode EM, bool DO_B, bool DO_A>
void backward_task(const BackwardPassParams<T>& p, const Tiling& tl, const TaskRange& r,
                   int64_t task, T* scratch) {
  const int64_t B = p.B, P = p.P, N = p.N, tc = tl.tile_cols;
  const RuleConsts<T> consts = load_rule_consts<R>(p.rule_args);  // see forward_task
  const int64_t chunk = task / tl.num_tiles, tile = task % tl.num_tiles;
  const int64_t rows = (r.b1 - r.b0) * tc;
  T* g_post_acc = scratch;        // per (b, j), summed over i
  T* g_eta_acc = scratch + rows;  // per (b, j), summed over i (EtaMode::PerPost)
  if constexpr (DO_A) fill_zero(scratch, 2 * rows);
  T g_alpha_scalar = 0, g_rate = 0;
  T* g_alpha_row_acc = nullptr;  // AlphaMode::Neuron: this chunk's (N,) accumulator
  if constexpr (DO_B && AM == AlphaMode::Neuron) g_alpha_row_acc = p.g_alpha_acc + chunk * N + r.j0;

  for (int64_t i = 0; i < P; ++i) {
    const T* w_row = DO_B ? p.w + i * N + r.j0 : nullptr;
    const T* a_row = DO_B ? alpha_row<AM>(p.alpha, i, N, r.j0) : nullptr;
    T* g_alpha_full =
        (DO_B && AM == AlphaMode::Full) ? p.g_alpha_acc + (chunk * P + i) * N + r.j0 : nullptr;
    T* g_eta_conn =
        (DO_A && EM == EtaMode::PerConnection) ? p.g_eta + (chunk * P + i) * N + r.j0 : nullptr;
    for (int64_t b = r.b0; b < r.b1; ++b) {
      const int64_t off = (b * P + i) * N + r.j0;
      T* g_hebb = p.g_hebb + off;
      // Part B (matvec adjoint, step t) then part A (rule adjoint, step s) on the same element.
      const T* hebb_b = DO_B ? p.b_hebb + off : nullptr;
      const T* g_u = DO_B ? p.g_u + b * N + r.j0 : nullptr;
      const T x = DO_B ? p.b_in[b * P + i] : T(0);
      const T* hebb_a = DO_A ? p.a_hebb + off : nullptr;
      const T* elig_a = (DO_A && has_elig<R>()) ? p.a_elig + off : hebb_a;
      T* g_elig = (DO_A && has_elig<R>()) ? p.g_elig + off : nullptr;
      const T pre = DO_A ? p.a_pre[b * P + i] : T(0);
      const T* post = DO_A ? p.a_post + b * N + r.j0 : nullptr;
      const T* eta = DO_A ? eta_row<EM>(p.a_eta, b, i, N, r.j0) : nullptr;
      T* g_post_b = g_post_acc + (b - r.b0) * tc;
      T* g_eta_b = g_eta_acc + (b - r.b0) * tc;
      auto element = [&](int64_t j, T& g_x, T& g_a, T& g_pre, T& g_r) {
        T g = g_hebb[j];
        if constexpr (DO_B) {
          const T a = alpha_at<AM>(a_row, j), h_read = trace_read<R>(hebb_b[j], consts);
          g_x += g_u[j] * (w_row[j] + a * h_read);
          const T g_aij = g_u[j] * x * h_read;
          if constexpr (AM == AlphaMode::Full) g_alpha_full[j] += g_aij;
          if constexpr (AM == AlphaMode::Neuron) g_alpha_row_acc[j] += g_aij;
          if constexpr (AM == AlphaMode::Scalar) g_a += g_aij;
          g += trace_read_backward<R>(g_u[j] * x * a, hebb_b[j], consts);
        }
        if constexpr (DO_A) {
          const T g_elig_out = has_elig<R>() ? g_elig[j] : T(0);
          const RuleGrads<T> rg =
              rule_backward<R>(g, g_elig_out, hebb_a[j], elig_a[j], pre, post[j], eta[j], consts);
          g = rg.hebb;
          if constexpr (has_elig<R>()) {
            g_elig[j] = rg.elig;
            g_r += rg.elig_rate;
          }
          g_post_b[j] += rg.post;
          if constexpr (EM == EtaMode::PerPost)
            g_eta_b[j] += rg.eta;
          else
            g_eta_conn[j] += rg.eta;
          g_pre += rg.pre;
        }
        g_hebb[j] = g;
      };
      // The row sums keep kLanes partial sums, one per vector lane, added pairwise at the end:
      // the vectoriser would otherwise add the lanes one after the other, for every row.
      T lx[kLanes<T>] = {}, la[kLanes<T>] = {}, lp[kLanes<T>] = {}, lr[kLanes<T>] = {};
      int64_t j = 0;
      for (; j + kLanes<T> <= r.nj; j += kLanes<T>) {
#pragma omp simd
        for (int l = 0; l < kLanes<T>; ++l) element(j + l, lx[l], la[l], lp[l], lr[l]);
      }
      T rx = 0, ra = 0, rp = 0, rr = 0;  // the columns left over, in registers
      for (; j < r.nj; ++j) element(j, rx, ra, rp, rr);
      if constexpr (DO_B) {
        p.g_in_partial[(tile * B + b) * P + i] = sum_lanes(lx) + rx;
        if constexpr (AM == AlphaMode::Scalar) g_alpha_scalar += sum_lanes(la) + ra;
      }
      if constexpr (DO_A) {
        p.g_pre_partial[(tile * B + b) * P + i] = sum_lanes(lp) + rp;
        if constexpr (has_elig<R>()) g_rate += sum_lanes(lr) + rr;
      }
    }
  }
  if constexpr (DO_B && AM == AlphaMode::Scalar) p.g_alpha_acc[task] += g_alpha_scalar;
  if constexpr (DO_A) {
    if constexpr (has_elig<R>()) p.g_elig_rate_acc[task] += g_rate;
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
    if (p.update && p.matvec)
      run(forward_task<T, R, AM, EM, true, true>);
    else if (p.update)
      run(forward_task<T, R, AM, EM, true, false>);
    else if (p.matvec)
      run(forward_task<T, R, AM, EM, false, true>);
  });
}

// Runs tasks [begin, end) of a backward pass; scratch holds 2 * chunk_size * tile_cols values.
template <typename T>
void backward_tasks(const BackwardPassParams<T>& p, const PassModes& modes, const Tiling& tl,
                    int64_t begin, int64_t end, T* scratch) {
  dispatch_modes(modes, [&]<Rule R, AlphaMode AM, EtaMode EM>() {
    auto run = [&](auto task_fn) {
      for (int64_t t = begin; t < end; ++t) task_fn(p, tl, task_range(tl, p.B, p.N, t), t, scratch);
    };
    if (p.do_b && p.do_a)
      run(backward_task<T, R, AM, EM, true, true>);
    else if (p.do_b)
      run(backward_task<T, R, AM, EM, true, false>);
    else if (p.do_a)
      run(backward_task<T, R, AM, EM, false, true>);
  });
}

template void forward_tasks<float>(const ForwardPassParams<float>&, const PassModes&, const Tiling&,
                                   int64_t, int64_t, float*);
template void forward_tasks<double>(const ForwardPassParams<double>&, const PassModes&,
                                    const Tiling&, int64_t, int64_t, double*);
template void backward_tasks<float>(const BackwardPassParams<float>&, const PassModes&,
                                    const Tiling&, int64_t, int64_t, float*);
template void backward_tasks<double>(const BackwardPassParams<double>&, const PassModes&,
                                     const Tiling&, int64_t, int64_t, double*);

}  // namespace BP_CPU_ISA
}  // namespace bp
