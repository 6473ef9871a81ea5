// The GPU whole-sequence ("persistent") kernels of the plastic RNN sequence op (sequence_pass.h):
// one launch runs all T steps of the forward, one all T steps of the backward, one block per
// sample. The sample's trace (forward) or trace gradient (backward), and the eligibility trace's,
// stays in shared memory for the whole sequence; only the checkpoints, the final traces and the
// backward's recomputed segments go through global memory. The same per-element formulas as
// every other path (plastic_math.h) and the same schedule (backward_schedule in
// sequence_pass.h, the load and both adjoints of a segment boundary fused, see below).
//
// A block is `slices` x `columns` threads: thread (r, j) owns post-synaptic column j (columns = N
// rounded up to a warp) and the rows i of slice r (N / slices of them, contiguous), so a warp
// reads and writes trace rows (i, .) coalesced, and every element (i, j) of a trace is touched
// by one thread only. Slices give an SM more warps to hide the latency of the global loads (the
// backward's traces and parameters): as many as the shared memory allows, up to 4, at most
// kSequenceMaxThreads threads. Sums over rows i of a column (the matvec u_j, dL/dpost_j, dL/deta_j)
// are thread-local within a slice, then added over the slices in slice order through shared
// memory; sums over columns j (dL/dx_i of the matvec, dL/dpre_i of the rule) go through shared
// memory, kRows rows per slice at a time (SequenceBackwardKernel). The modulator's K dot
// products over N are each summed by one thread (K is small; no K-sized shared buffer, so the
// shared memory depends on N only). No atomics: every output and accumulator has one owner,
// every sum a fixed order, so results are bitwise reproducible.
#pragma once

#include <cmath>
#include <cstdint>

#include "../plastic_math.h"
#include "../sequence_pass.h"
#include "phased.h"
#include "trace_kernels.h"

namespace bp::kern {

// Quotient of non-negative values that fit in 32 bits: the per-phase decoding of the kernels
// divides by runtime values, and a 64-bit division is a long instruction sequence on a GPU.
BP_KERNEL int64_t div32(int64_t a, int64_t b) { return static_cast<int>(a) / static_cast<int>(b); }
// Step t's segment of checkpoint interval L: t / L for a step t (< 2^31) and any L >= 1 (an
// interval may be as large as int64 allows).
BP_KERNEL int64_t segment_of(int64_t t, int64_t L) { return L > t ? 0 : div32(t, L); }

// Columns of a block of the whole-sequence kernels: N rounded up to whole warps.
BP_KERNEL int64_t sequence_columns(int64_t N) { return (N + 31) / 32 * 32; }
constexpr int64_t kMaxSlices = 4;
// Threads per block at most: with 128 registers per thread, what an SM holds for one block.
constexpr int kSequenceMaxThreads = 512;

// Rows per slice and chunk of the backward's sums over columns (see SequenceBackwardKernel).
constexpr int64_t kSequenceRows = 16;

// Shared memory of the whole-sequence kernels, in values of the element type.
BP_KERNEL int64_t sequence_forward_shared(int64_t N, bool retro, int64_t slices) {
  return (retro ? 2 : 1) * N * N + 2 * N + slices * sequence_columns(N);
}
BP_KERNEL int64_t sequence_backward_shared(int64_t N, bool retro, int64_t slices) {
  const int64_t columns = sequence_columns(N);
  return (retro ? 2 : 1) * N * N + slices * 2 * kSequenceRows * (columns + 1) +
         3 * slices * columns + 4 * N;
}

// The most row slices (4, 2 or 1) whose block fits `limit` bytes of shared memory.
inline int64_t sequence_slices(int64_t N, bool retro, int64_t itemsize, int64_t limit,
                               bool backward) {
  for (int64_t s = kMaxSlices; s > 1; s /= 2) {
    const int64_t shared =
        backward ? sequence_backward_shared(N, retro, s) : sequence_forward_shared(N, retro, s);
    if (s * sequence_columns(N) <= kSequenceMaxThreads && shared * itemsize <= limit) return s;
  }
  return 1;
}

// Where thread `thread` of a block works: column j of row slice r, rows [i0, i1).
struct SliceRange {
  int64_t r, j, i0, i1;
};
BP_KERNEL SliceRange slice_range(int64_t N, int64_t slices, int thread) {
  const int64_t columns = sequence_columns(N), rows = div32(N + slices - 1, slices);
  SliceRange s{};
  s.r = div32(thread, columns);
  s.j = thread - s.r * columns;
  s.i0 = s.r * rows < N ? s.r * rows : N;
  s.i1 = s.i0 + rows < N ? s.i0 + rows : N;
  return s;
}

// The forward of a whole sequence. Phases: 0 load H_0 (E_0) and h_0; 1 the slices' partial sums
// of u_1 = h_0 @ (w + A H_0); then per step t: the cell (u_t from the partial sums, h_t), the
// modulator (m_t; with modulation only), and the rule update H_t with the partial sums of the
// next step's matvec u_{t+1} (one sweep over the trace in shared memory).
template <typename T, Rule R, AlphaMode AM, EtaMode EM>
struct SequenceForwardKernel {
  using Value = T;
  static constexpr int kMaxThreads = static_cast<int>(kSequenceMaxThreads);
  struct Regs {
    T x;           // x_t of the column, loaded during the previous phase that has time for it
    bool clamped;  // clamp_t of the column
  };
  int64_t steps, B, N, K, L, slices;
  Modulation modulation;
  T clip;
  Span<const T> elig_rate, x, h0, hebb0, elig0, w, alpha, eta_fixed, h2mod_w, h2mod_b, fanout_w,
      fanout_b;
  Span<const bool> clamp;
  Span<T> out, m, eta_seq, hebb_T, elig_T, ckpt_h, ckpt_e;

  BP_KERNEL int64_t grid() const { return B; }
  BP_KERNEL int block() const { return static_cast<int>(slices * sequence_columns(N)); }
  BP_KERNEL int64_t shared_size() const {
    return sequence_forward_shared(N, has_elig<R>(), slices);
  }
  BP_KERNEL int64_t phases_per_step() const { return modulation == Modulation::None ? 2 : 3; }
  BP_KERNEL int phases() const { return static_cast<int>(2 + steps * phases_per_step()); }

  // Loads x_t (and clamp_t) of column j for the cell of step t, a phase ahead of it, so that the
  // load's latency overlaps the sweep instead of delaying the step.
  BP_KERNEL void prefetch(int64_t t, int64_t b, int64_t j, Regs& reg) const {
    const int64_t at = ((t - 1) * B + b) * N + j;
    reg.x = x[at];
    reg.clamped = !clamp.empty() && clamp[at];
  }

  BP_KERNEL void run(int phase, const ThreadPos& pos, Regs& reg, Span<T> smem) const {
    const SliceRange sr = slice_range(N, slices, pos.thread);
    const int64_t b = pos.block, j = sr.j, NN = N * N, columns = sequence_columns(N);
    const Span<T> hebb = smem.sub(0, NN);
    const Span<T> elig = has_elig<R>() ? smem.sub(NN, NN) : Span<T>{};
    int64_t at = (has_elig<R>() ? 2 : 1) * NN;
    const Span<T> hbuf = smem.sub(at, 2 * N);                       // h_t at (t % 2) N
    const Span<T> u_part = smem.sub(at + 2 * N, slices * columns);  // per slice, per column
    if (phase == 0) {
      if (j >= N) return;
      for (int64_t i = sr.i0; i < sr.i1; ++i) {
        hebb[i * N + j] = hebb0[b * NN + i * N + j];
        if constexpr (has_elig<R>()) elig[i * N + j] = elig0[b * NN + i * N + j];
      }
      if (sr.r == 0) hbuf[j] = h0[b * N + j];
      return;
    }
    if (phase == 1) {
      if (j >= N) return;
      const RuleConsts<T> consts = rule_consts<R>(clip, elig_rate);
      T acc = T(0);
      for (int64_t i = sr.i0; i < sr.i1; ++i)
        acc += hbuf[i] * (w[i * N + j] +
                          alpha_of<AM>(alpha, i, j, N) * trace_read<R>(hebb[i * N + j], consts));
      u_part[sr.r * columns + j] = acc;
      if (sr.r == 0) prefetch(1, b, j, reg);
      return;
    }
    const int64_t t = div32(phase - 2, phases_per_step()) + 1;
    const int64_t sub = phase - 2 - (t - 1) * phases_per_step();
    const int64_t row = (t - 1) * B + b;  // (step, sample) row of the (T, B, .) sequences
    const Span<T> h_now = hbuf.sub((t % 2) * N, N), h_before = hbuf.sub(((t - 1) % 2) * N, N);
    if (sub == 0) {  // the cell
      if (j >= N || sr.r != 0) return;
      T u = T(0);
      for (int64_t r = 0; r < slices; ++r) u += u_part[r * columns + j];
      T h = typed_tanh(reg.x + u);
      if (reg.clamped) h = reg.x;  // clamped: h_t = x_t
      h_now[j] = h;
      out[row * N + j] = h;
      return;
    }
    if (sub == 1 && modulation != Modulation::None) {  // m_t = tanh(h2mod(h_t))
      for (int64_t k = pos.thread; k < K; k += pos.block_dim) {
        T s = T(0);
        for (int64_t i = 0; i < N; ++i) s += h2mod_w[k * N + i] * h_now[i];
        m[row * K + k] = typed_tanh(h2mod_b[k] + s);
      }
      return;
    }
    // The rule update of step t, with the partial sums of u_{t+1} in the same sweep.
    if (j >= N) return;
    T eta_j = T(0);
    if (modulation == Modulation::Simple) {
      eta_j = m[row * K];
    } else if (modulation == Modulation::Fanout) {
      T s = T(0);
      for (int64_t k = 0; k < K; ++k) s += fanout_w[j * K + k] * m[row * K + k];
      eta_j = fanout_b[j] + s;
    } else if constexpr (EM == EtaMode::PerPost) {
      eta_j = eta_fixed[b * N + j];
    }
    if (modulation != Modulation::None && sr.r == 0) eta_seq[row * N + j] = eta_j;
    // Where H_t goes besides shared memory: the final trace, a checkpoint, or nowhere.
    const int64_t BNN = B * NN;
    int64_t dest = -1;
    Span<T> dest_h, dest_e;
    if (t == steps) {
      dest = b * NN;
      dest_h = hebb_T;
      dest_e = elig_T;
    } else if (t - segment_of(t, L) * L == 0) {
      dest = (segment_of(t, L) - 1) * BNN + b * NN;
      dest_h = ckpt_h;
      dest_e = ckpt_e;
    }
    const RuleConsts<T> consts = rule_consts<R>(clip, elig_rate);
    const T post = h_now[j];
    const bool matvec = t < steps;
    T acc = T(0);
    for (int64_t i = sr.i0; i < sr.i1; ++i) {
      const int64_t e_at = i * N + j;
      const T eta = EM == EtaMode::PerPost ? eta_j : eta_fixed[e_at];
      T h_new, e_new = T(0);
      rule_forward<R>(hebb[e_at], has_elig<R>() ? elig[e_at] : T(0), h_before[i], post, eta, consts,
                      h_new, e_new);
      hebb[e_at] = h_new;
      if constexpr (has_elig<R>()) elig[e_at] = e_new;
      if (dest >= 0) {
        dest_h[dest + e_at] = h_new;
        if constexpr (has_elig<R>()) dest_e[dest + e_at] = e_new;
      }
      if (matvec)
        acc += h_now[i] * (w[e_at] + alpha_of<AM>(alpha, i, j, N) * trace_read<R>(h_new, consts));
    }
    if (matvec) u_part[sr.r * columns + j] = acc;
    if (matvec && sr.r == 0) prefetch(t + 1, b, j, reg);
  }
};

// The backward of a whole sequence: backward_schedule for one sample per block, with dL/dH (and
// dL/dE) in shared memory. Iterations run t = T + 1 down to 1, s = t - 1: the adjoint of the
// matvec of step t (t <= T) and of the rule of step s (s >= 1) in one sweep over the trace, then
// dL/dh_{t-1} (matvec_done) and the modulator's and the cell's backward of step s (rule_done).
// Segment k's traces are recomputed by each thread for its own elements, into the global
// segment scratch, at the start of the sweep that first needs them: H_{s-1} of the rule's
// adjoint is in segment (s - 1) / L, while H_s of the matvec's adjoint is then a checkpoint, so
// the CPU schedule's split sweep at a segment boundary is one sweep here, with the same
// arithmetic.
//
// Sums over columns j (dL/dx_i, dL/dpre_i) per chunk of kRows rows of every slice: (X) each
// thread stages its 2 kRows contributions, (Y) each thread adds kWidth = 2 kRows staged values
// of one (sum, segment), and the next X phase (or Z after the last chunk) adds each sum's
// columns / kWidth segments. Z also stages the slices' partial sums of dL/dpost_j and dL/deta_j.
// Phases per iteration: 2 chunks + 1, then D1 (dL/dh, the rate's gradient) and, with
// modulation, D2 (dL/dm, one thread per modulator) and D3 (the cell's backward: dL/du_s);
// without modulation D1 does the cell's backward. Phase 0 loads dL/dH_T (dL/dE_T); the last two
// store dL/dH_0 (dL/dE_0) and the block's sums over threads (alpha, elig_rate) in a fixed order.
template <typename T, Rule R, AlphaMode AM, EtaMode EM>
struct SequenceBackwardKernel {
  using Value = T;
  static constexpr int kMaxThreads = static_cast<int>(kSequenceMaxThreads);
  static constexpr int64_t kRows = kSequenceRows;
  static constexpr int64_t kWidth = 2 * kRows;  // staged values per segment sum
  struct Regs {
    T pending;            // dL/dh_s through the rule of step s + 1 (the last sweep's row sums)
    T g_h;                // dL/dh_s through step s + 1, between D1 and D3
    T post;               // dL/dpost_s of the column, between D1 and D3
    T post_acc, eta_acc;  // the slice's part of dL/dpost_s, dL/deta_s of the column
    T alpha_neuron, alpha_scalar, rate;  // the thread's part, accumulated over all steps
  };
  int64_t steps, B, N, K, L, slices;
  Modulation modulation;
  T clip;
  Span<const T> elig_rate, h0, hebb0, elig0, w, alpha, eta_fixed, h2mod_w, fanout_w, out, m,
      eta_seq, ckpt_h, ckpt_e, grad_out, grad_m;
  Span<const bool> clamp;
  Span<T> g_hebb, g_elig, g_u, g_x, g_h0, g_z, g_eta_seq, g_eta_post, g_alpha_acc, g_eta_conn,
      g_rate_acc, seg_h, seg_e;

  BP_KERNEL int64_t columns() const { return sequence_columns(N); }
  BP_KERNEL int64_t grid() const { return B; }
  BP_KERNEL int block() const { return static_cast<int>(slices * columns()); }
  BP_KERNEL int64_t shared_size() const {
    return sequence_backward_shared(N, has_elig<R>(), slices);
  }
  BP_KERNEL int64_t chunks() const {
    const int64_t rows = div32(N + slices - 1, slices);
    return (rows + kRows - 1) / kRows;
  }
  BP_KERNEL int64_t sums() const { return slices * 2 * kRows; }  // row sums per chunk
  BP_KERNEL int64_t sweep_phases() const { return 2 * chunks() + 1; }
  BP_KERNEL int64_t iteration_phases() const {
    return sweep_phases() + (modulation == Modulation::None ? 1 : 3);
  }
  BP_KERNEL int phases() const {
    return static_cast<int>(1 + (steps + 1) * iteration_phases() + 2);
  }

  // Shared memory, in this order (sequence_backward_shared).
  struct Shared {
    Span<T> g_hebb, g_elig, staged, segments, col_post, col_eta, g_in, g_pre, g_eta, g_u;
  };
  BP_KERNEL Shared shared(Span<T> smem) const {
    const int64_t NN = N * N, C = columns(), staged = sums() * (C + 1);
    Shared s;
    int64_t at = 0;
    s.g_hebb = smem.sub(at, NN);
    at += NN;
    if constexpr (has_elig<R>()) {
      s.g_elig = smem.sub(at, NN);
      at += NN;
    }
    s.staged = smem.sub(at, staged);
    at += staged;
    s.segments = smem.sub(at, slices * C);
    at += slices * C;
    s.col_post = smem.sub(at, slices * C);
    at += slices * C;
    s.col_eta = smem.sub(at, slices * C);
    at += slices * C;
    s.g_in = smem.sub(at, N);
    at += N;
    s.g_pre = smem.sub(at, N);
    at += N;
    s.g_eta = smem.sub(at, N);
    at += N;
    s.g_u = smem.sub(at, N);
    return s;
  }

  // h_t of sample b, element i (h_0 for t = 0).
  BP_KERNEL T h_at(int64_t t, int64_t b, int64_t i) const {
    return t == 0 ? h0[b * N + i] : out[((t - 1) * B + b) * N + i];
  }
  // Sample b's trace t of a segment in memory: the initial trace, a checkpoint, or a recomputed
  // one (looked up once per phase, then indexed per element).
  BP_KERNEL Span<const T> trace_of(const Span<const T>& initial, const Span<const T>& checkpoints,
                                   const Span<T>& segment, int64_t t, int64_t b) const {
    const int64_t NN = N * N, k = segment_of(t, L), rem = t - k * L;
    if (t == 0) return initial.sub(b * NN, NN);
    if (rem == 0) return checkpoints.sub(((k - 1) * B + b) * NN, NN);
    const Span<T> recomputed = segment.sub(((rem - 1) * B + b) * NN, NN);
    return {recomputed.data, recomputed.size};
  }
  BP_KERNEL T eta_at(int64_t t, int64_t b, int64_t i, int64_t j) const {
    if (modulation != Modulation::None) return eta_seq[((t - 1) * B + b) * N + j];
    return EM == EtaMode::PerPost ? eta_fixed[b * N + j] : eta_fixed[i * N + j];
  }

  BP_KERNEL void run(int phase, const ThreadPos& pos, Regs& reg, Span<T> smem) const {
    const SliceRange sr = slice_range(N, slices, pos.thread);
    const int64_t b = pos.block, j = sr.j, NN = N * N, C = columns();
    const int64_t threads = pos.block_dim;
    const Shared sh = shared(smem);
    const RuleConsts<T> consts = rule_consts<R>(clip, elig_rate);
    const int64_t last = phases() - 2;
    if (phase == 0) {
      if (j >= N) return;
      for (int64_t i = sr.i0; i < sr.i1; ++i) {
        sh.g_hebb[i * N + j] = g_hebb[b * NN + i * N + j];
        if constexpr (has_elig<R>()) sh.g_elig[i * N + j] = g_elig[b * NN + i * N + j];
      }
      return;
    }
    if (phase == last) {
      if (j < N) {
        for (int64_t i = sr.i0; i < sr.i1; ++i) {
          g_hebb[b * NN + i * N + j] = sh.g_hebb[i * N + j];
          if constexpr (has_elig<R>()) g_elig[b * NN + i * N + j] = sh.g_elig[i * N + j];
        }
      }
      sh.staged[pos.thread] = reg.alpha_scalar;
      sh.staged[threads + pos.thread] = reg.rate;
      sh.staged[2 * threads + pos.thread] = reg.alpha_neuron;
      return;
    }
    if (phase == last + 1) {
      if constexpr (AM == AlphaMode::Neuron) {
        if (sr.r == 0 && j < N) {
          T a = T(0);
          for (int64_t r = 0; r < slices; ++r) a += sh.staged[2 * threads + r * C + j];
          g_alpha_acc[b * N + j] += a;
        }
      }
      if (pos.thread != 0) return;
      T a = T(0), rate = T(0);
      for (int64_t k = 0; k < threads; ++k) {
        a += sh.staged[k];
        rate += sh.staged[threads + k];
      }
      if constexpr (AM == AlphaMode::Scalar) g_alpha_acc[b] += a;
      if constexpr (has_elig<R>()) g_rate_acc[b] += rate;
      return;
    }
    const int64_t it = div32(phase - 1, iteration_phases());
    const int64_t sub = phase - 1 - it * iteration_phases();
    const int64_t t = steps + 1 - it, s = t - 1;
    const int64_t n_chunks = chunks();
    if (sub < sweep_phases()) {
      const int64_t c = sub / 2;
      if (sub % 2 == 0 && c > 0) finish_row_sums(c - 1, pos.thread, sh);
      if (sub % 2 == 0 && c < n_chunks) {
        if (c == 0) {
          reg.post_acc = T(0);
          reg.eta_acc = T(0);
          const bool new_segment = s >= 1 && (s == steps || s - segment_of(s, L) * L == 0);
          if (new_segment && j < N) load_segment(segment_of(s - 1, L), b, sr, consts);
        }
        stage_chunk(c, t, s, b, sr, consts, reg, sh);
      } else if (sub % 2 == 1) {
        segment_sums(pos.thread, sh);
      } else {  // Z: the slices' parts of the per-column sums
        sh.col_post[sr.r * C + j] = reg.post_acc;
        sh.col_eta[sr.r * C + j] = reg.eta_acc;
      }
      return;
    }
    const int64_t d = sub - sweep_phases();
    const int64_t row = (s - 1) * B + b;  // (step s, sample) row of the (T, B, .) sequences
    if (d == 0) {                         // matvec_done(t) and the first half of rule_done(s)
      if (j >= N || sr.r != 0) return;
      const T g_h = sh.g_in[j] + reg.pending;
      reg.pending = sh.g_pre[j];
      if (t == 1) g_h0[b * N + j] = g_h;
      if (s < 1) return;
      T g_eta = T(0), post = T(0);
      for (int64_t r = 0; r < slices; ++r) {
        g_eta += sh.col_eta[r * C + j];
        post += sh.col_post[r * C + j];
      }
      reg.post = post;
      if constexpr (EM == EtaMode::PerPost) {
        if (modulation == Modulation::None) g_eta_post[b * N + j] += g_eta;
      }
      if (modulation == Modulation::Fanout) g_eta_seq[row * N + j] = g_eta;
      if (modulation == Modulation::None) {
        cell_backward(row, j, g_h, T(0), reg, sh);
      } else {
        sh.g_eta[j] = g_eta;
        reg.g_h = g_h;
      }
      return;
    }
    if (s < 1) return;
    if (d == 1) {  // dL/dm_s through eta = m ("simple") or fanout(m), then through the tanh
      for (int64_t k = pos.thread; k < K; k += threads) {
        T g_m = T(0);
        for (int64_t i = 0; i < N; ++i)
          g_m += modulation == Modulation::Simple ? sh.g_eta[i] : sh.g_eta[i] * fanout_w[i * K + k];
        if (!grad_m.empty()) g_m += grad_m[row * K + k];
        const T m_k = m[row * K + k];
        g_z[row * K + k] = g_m * (T(1) - m_k * m_k);
      }
      return;
    }
    if (j >= N || sr.r != 0) return;  // d == 2
    T g_mod_in = T(0);
    for (int64_t k = 0; k < K; ++k) g_mod_in += g_z[row * K + k] * h2mod_w[k * N + j];
    cell_backward(row, j, reg.g_h, g_mod_in, reg, sh);
  }

  // dL/du_s = dL/dh_s (through the rule of step s, step s + 1, the output, the modulator) times
  // tanh'; clamped neurons pass it to x_s instead. Into g_u (global) and the shared copy the
  // next sweep's matvec adjoint reads.
  BP_KERNEL void cell_backward(int64_t row, int64_t j, T g_h, T g_mod_in, const Regs& reg,
                               const Shared& sh) const {
    T g = reg.post + g_h;
    if (!grad_out.empty()) g += grad_out[row * N + j];
    if (modulation != Modulation::None) g += g_mod_in;
    const T h = out[row * N + j];
    T gu = g * (T(1) - h * h);
    if (!clamp.empty()) {
      const bool clamped = clamp[row * N + j];
      g_x[row * N + j] = clamped ? g : gu;
      gu = clamped ? T(0) : gu;
    }
    g_u[row * N + j] = gu;
    sh.g_u[j] = gu;
  }

  // Recomputes segment k's traces H_{kL+1} .. H_{min(kL+L, T)-1} of the thread's elements into
  // the scratch.
  BP_KERNEL void load_segment(int64_t k, int64_t b, const SliceRange& sr,
                              const RuleConsts<T>& consts) const {
    const int64_t start = k * L, end = start + L < steps ? start + L : steps, NN = N * N;
    const int64_t j = sr.j;
    const Span<const T> h_start = trace_of(hebb0, ckpt_h, seg_h, start, b);
    const Span<const T> e_start =
        has_elig<R>() ? trace_of(elig0, ckpt_e, seg_e, start, b) : Span<const T>{};
    for (int64_t i = sr.i0; i < sr.i1; ++i) {
      const int64_t at = i * N + j;
      T h = h_start[at];
      T e = has_elig<R>() ? e_start[at] : T(0);
      for (int64_t t = start + 1; t < end; ++t) {
        T h_new, e_new = T(0);
        rule_forward<R>(h, e, h_at(t - 1, b, i), h_at(t, b, j), eta_at(t, b, i, j), consts, h_new,
                        e_new);
        h = h_new;
        e = e_new;
        const int64_t slot = ((t - start - 1) * B + b) * NN + at;
        seg_h[slot] = h;
        if constexpr (has_elig<R>()) seg_e[slot] = e;
      }
    }
  }

  // Phase X of chunk c: the adjoints of the slice's rows i0 + c kRows .. of column j, each
  // thread's contributions to the row sums staged as (slice, kind: 0 dL/dx of the matvec, 1
  // dL/dpre of the rule, row, column), rows columns + 1 apart.
  BP_KERNEL void stage_chunk(int64_t c, int64_t t, int64_t s, int64_t b, const SliceRange& sr,
                             const RuleConsts<T>& consts, Regs& reg, const Shared& sh) const {
    const bool do_b = t <= steps, do_a = s >= 1;
    const int64_t j = sr.j, C = columns(), NN = N * N;
    const T g_u_j = do_b && j < N ? sh.g_u[j] : T(0);
    const Span<const T> b_hebb = do_b ? trace_of(hebb0, ckpt_h, seg_h, t - 1, b) : Span<const T>{};
    const Span<const T> a_hebb = do_a ? trace_of(hebb0, ckpt_h, seg_h, s - 1, b) : Span<const T>{};
    const Span<const T> a_elig =
        do_a && has_elig<R>() ? trace_of(elig0, ckpt_e, seg_e, s - 1, b) : Span<const T>{};
    for (int64_t r = 0; r < kRows; ++r) {
      const int64_t i = sr.i0 + c * kRows + r;
      T g_x = T(0), g_pre = T(0);
      if (i < sr.i1 && j < N) {
        const int64_t at = i * N + j;
        T g = sh.g_hebb[at];
        if (do_b) {
          const T a = alpha_of<AM>(alpha, i, j, N), x = h_at(t - 1, b, i);
          const T h = b_hebb[at], h_read = trace_read<R>(h, consts);
          g_x = g_u_j * (w[at] + a * h_read);
          const T g_a = g_u_j * x * h_read;
          if constexpr (AM == AlphaMode::Full) g_alpha_acc[b * NN + at] += g_a;
          if constexpr (AM == AlphaMode::Neuron) reg.alpha_neuron += g_a;
          if constexpr (AM == AlphaMode::Scalar) reg.alpha_scalar += g_a;
          g += trace_read_backward<R>(g_u_j * x * a, h, consts);
        }
        if (do_a) {
          const T g_e = has_elig<R>() ? sh.g_elig[at] : T(0);
          const T e = has_elig<R>() ? a_elig[at] : T(0);
          const RuleGrads<T> rg = rule_backward<R>(g, g_e, a_hebb[at], e, h_at(s - 1, b, i),
                                                   h_at(s, b, j), eta_at(s, b, i, j), consts);
          g = rg.hebb;
          if constexpr (has_elig<R>()) {
            sh.g_elig[at] = rg.elig;
            reg.rate += rg.elig_rate;
          }
          reg.post_acc += rg.post;
          if constexpr (EM == EtaMode::PerPost)
            reg.eta_acc += rg.eta;
          else
            g_eta_conn[b * NN + at] += rg.eta;
          g_pre = rg.pre;
        }
        sh.g_hebb[at] = g;
      }
      const int64_t sum = sr.r * 2 * kRows + r;
      sh.staged[sum * (C + 1) + j] = g_x;
      sh.staged[(sum + kRows) * (C + 1) + j] = g_pre;
    }
  }

  // Phase Y: thread q adds the kWidth staged values of segment q / sums() of row sum
  // q % sums() (columns / kWidth segments per sum: exactly one task per thread). Consecutive
  // threads read consecutive sums, columns + 1 apart: 32 different banks per warp.
  BP_KERNEL void segment_sums(int64_t q, const Shared& sh) const {
    const int64_t n = sums(), seg = div32(q, n), sum = q - seg * n, C = columns();
    T acc = T(0);
    for (int64_t k = 0; k < kWidth; ++k) acc += sh.staged[sum * (C + 1) + seg * kWidth + k];
    sh.segments[seg * n + sum] = acc;
  }

  // The row sums of chunk c from the segments: dL/dx_i into g_in, dL/dpre_i into g_pre.
  BP_KERNEL void finish_row_sums(int64_t c, int64_t q, const Shared& sh) const {
    const int64_t n = sums();
    if (q >= n) return;
    const int64_t r = q / (2 * kRows), kind = q % (2 * kRows) / kRows;
    const int64_t rows = div32(N + slices - 1, slices);
    const int64_t i = r * rows + c * kRows + q % kRows;
    if (i >= N || i >= (r + 1) * rows) return;
    T acc = T(0);
    for (int64_t seg = 0; seg < columns() / kWidth; ++seg) acc += sh.segments[seg * n + q];
    (kind == 0 ? sh.g_in : sh.g_pre)[i] = acc;
  }
};

}  // namespace bp::kern
