// The GPU whole-sequence ("persistent") kernels of the plastic RNN sequence op (sequence_pass.h):
// one launch runs all T steps of the forward, one all T steps of the backward, one block per
// sample. The sample's trace (forward) or trace gradient (backward), and the eligibility trace's,
// stays in shared memory for the whole sequence; only the checkpoints, the final traces and the
// backward's recomputed segments go through global memory. The same per-element formulas as
// every other path (plastic_math.h) and the same schedule (backward_schedule in
// sequence_pass.h, the load and both adjoints of a segment boundary fused, see below).
//
// Threads own one post-synaptic column j each (block = N rounded up to a warp; the shared-memory
// limit keeps N far below 1024), so a thread reads and writes trace rows (i, .) coalesced with
// its neighbours, and every element (i, j) of a trace is touched by thread j only: the rule, the
// matvec accumulator u_j and the sums over rows i (dL/dpost_j, dL/deta_j) are thread-local. Sums
// over columns j (dL/dx_i of the matvec, dL/dpre_i of the rule) go through shared memory, kRows
// rows at a time (SequenceBackwardKernel). The modulator's K dot products over N are each summed
// by one thread (K is small; no K-sized shared buffer, so the shared-memory size depends on N
// only). No atomics: every output and accumulator has one owner, sums are in a fixed order.
#pragma once

#include <cmath>
#include <cstdint>

#include "../plastic_math.h"
#include "../sequence_pass.h"
#include "phased.h"
#include "trace_kernels.h"

namespace bp::kern {

template <typename T>
BP_KERNEL T tanh_of(T v) {
  if constexpr (sizeof(T) == sizeof(float)) return tanhf(v);
  else return tanh(v);
}

// Threads per block of the whole-sequence kernels: one per column, a whole number of warps.
BP_KERNEL int sequence_threads(int64_t N) { return static_cast<int>((N + 31) / 32 * 32); }

// Rows per chunk of the backward's sums over columns (see SequenceBackwardKernel).
constexpr int64_t kSequenceRows = 16;

// Shared memory of the whole-sequence kernels, in values of the element type.
BP_KERNEL int64_t sequence_forward_shared(int64_t N, bool retro) {
  return (retro ? 2 : 1) * N * N + 2 * N;
}
BP_KERNEL int64_t sequence_backward_shared(int64_t N, bool retro) {
  const int64_t threads = sequence_threads(N);
  return (retro ? 2 : 1) * N * N + 2 * kSequenceRows * (threads + 1) + threads + 3 * N;
}

// The forward of a whole sequence. Phases: 0 load H_0 (E_0) and h_0; 1 u_1 = h_0 @ (w + A H_0);
// then per step t: the cell (h_t), the modulator (m_t; with modulation only), and the rule update
// H_t with the next step's matvec u_{t+1} fused (one sweep over the trace in shared memory).
template <typename T, Rule R, AlphaMode AM, EtaMode EM>
struct SequenceForwardKernel {
  using Value = T;
  struct Regs {
    T u, h;  // u_t and h_t of the thread's column
  };
  int64_t steps, B, N, K, L;
  Modulation modulation;
  T clip;
  Span<const T> elig_rate, x, h0, hebb0, elig0, w, alpha, eta_fixed, h2mod_w, h2mod_b, fanout_w,
      fanout_b;
  Span<const bool> clamp;
  Span<T> out, m, eta_seq, hebb_T, elig_T, ckpt_h, ckpt_e;

  BP_KERNEL int64_t grid() const { return B; }
  BP_KERNEL int block() const { return sequence_threads(N); }
  BP_KERNEL int64_t shared_size() const { return sequence_forward_shared(N, has_elig<R>()); }
  BP_KERNEL int64_t phases_per_step() const { return modulation == Modulation::None ? 2 : 3; }
  BP_KERNEL int phases() const { return static_cast<int>(2 + steps * phases_per_step()); }

  BP_KERNEL void run(int phase, const ThreadPos& pos, Regs& reg, Span<T> smem) const {
    const int64_t b = pos.block, j = pos.thread, NN = N * N;
    const Span<T> hebb = smem.sub(0, NN);
    const Span<T> elig = has_elig<R>() ? smem.sub(NN, NN) : Span<T>{};
    const Span<T> hbuf = smem.sub((has_elig<R>() ? 2 : 1) * NN, 2 * N);  // h_t at (t % 2) N
    if (phase == 0) {
      if (j >= N) return;
      for (int64_t i = 0; i < N; ++i) {
        hebb[i * N + j] = hebb0[b * NN + i * N + j];
        if constexpr (has_elig<R>()) elig[i * N + j] = elig0[b * NN + i * N + j];
      }
      hbuf[j] = h0[b * N + j];
      return;
    }
    if (phase == 1) {
      if (j >= N) return;
      T acc = T(0);
      for (int64_t i = 0; i < N; ++i)
        acc += hbuf[i] * (w[i * N + j] + alpha_of<AM>(alpha, i, j, N) * hebb[i * N + j]);
      reg.u = acc;
      return;
    }
    const int64_t t = (phase - 2) / phases_per_step() + 1, sub = (phase - 2) % phases_per_step();
    const int64_t row = (t - 1) * B + b;  // (step, sample) row of the (T, B, .) sequences
    const Span<T> h_now = hbuf.sub((t % 2) * N, N), h_before = hbuf.sub(((t - 1) % 2) * N, N);
    if (sub == 0) {  // the cell
      if (j >= N) return;
      const T x_j = x[row * N + j];
      T h = tanh_of(x_j + reg.u);
      if (!clamp.empty() && clamp[row * N + j]) h = x_j;  // clamped: h_t = x_t
      reg.h = h;
      h_now[j] = h;
      out[row * N + j] = h;
      return;
    }
    if (sub == 1 && modulation != Modulation::None) {  // m_t = tanh(h2mod(h_t))
      for (int64_t k = j; k < K; k += pos.block_dim) {
        T s = T(0);
        for (int64_t i = 0; i < N; ++i) s += h2mod_w[k * N + i] * h_now[i];
        m[row * K + k] = tanh_of(h2mod_b[k] + s);
      }
      return;
    }
    // The rule update of step t, with u_{t+1} in the same sweep.
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
    if (modulation != Modulation::None) eta_seq[row * N + j] = eta_j;
    // Where H_t goes besides shared memory: the final trace, a checkpoint, or nowhere.
    const int64_t BNN = B * NN;
    int64_t dest = -1;
    Span<T> dest_h, dest_e;
    if (t == steps) {
      dest = b * NN; dest_h = hebb_T; dest_e = elig_T;
    } else if (t % L == 0) {
      dest = (t / L - 1) * BNN + b * NN; dest_h = ckpt_h; dest_e = ckpt_e;
    }
    const RuleConsts<T> consts{clip, has_elig<R>() ? elig_rate[0] : T(0)};
    const T post = reg.h;
    const bool matvec = t < steps;
    T acc = T(0);
    for (int64_t i = 0; i < N; ++i) {
      const int64_t at = i * N + j;
      const T eta = EM == EtaMode::PerPost ? eta_j : eta_fixed[at];
      T h_new, e_new = T(0);
      rule_forward<R>(hebb[at], has_elig<R>() ? elig[at] : T(0), h_before[i], post, eta, consts,
                      h_new, e_new);
      hebb[at] = h_new;
      if constexpr (has_elig<R>()) elig[at] = e_new;
      if (dest >= 0) {
        dest_h[dest + at] = h_new;
        if constexpr (has_elig<R>()) dest_e[dest + at] = e_new;
      }
      if (matvec) acc += h_now[i] * (w[at] + alpha_of<AM>(alpha, i, j, N) * h_new);
    }
    reg.u = acc;
  }
};

// The backward of a whole sequence: backward_schedule for one sample per block, with dL/dH (and
// dL/dE) in shared memory. Iterations run t = T + 1 down to 1, s = t - 1: the adjoint of the
// matvec of step t (t <= T) and of the rule of step s (s >= 1) in one sweep over the trace, then
// dL/dh_{t-1} (matvec_done) and the modulator's and the cell's backward of step s (rule_done).
// Segment k's traces are recomputed by each thread for its own column, into the global segment
// scratch, at the start of the sweep that first needs them: H_{s-1} of the rule's adjoint is in
// segment (s - 1) / L, while H_s of the matvec's adjoint is then a checkpoint, so the CPU
// schedule's split sweep at a segment boundary is one sweep here, with the same arithmetic.
//
// Sums over columns j (dL/dx_i, dL/dpre_i) per chunk of kRows rows: (X) each thread stages its
// 2 kRows contributions, (Y) each thread adds kWidth = 2 kRows staged values of one (sum,
// segment), and the next X phase (or Z after the last chunk) adds each sum's block / kWidth
// segments. Phases per iteration: 2 chunks + 1, then D1 (dL/dh, the rate's gradient) and, with
// modulation, D2 (dL/dm, one thread per modulator) and D3 (the cell's backward: dL/du_s); without
// modulation D1 does the cell's backward. Phase 0 loads dL/dH_T (dL/dE_T); the last two store
// dL/dH_0 (dL/dE_0) and the block's scalar sums (alpha scalar, elig_rate), in thread order.
template <typename T, Rule R, AlphaMode AM, EtaMode EM>
struct SequenceBackwardKernel {
  using Value = T;
  static constexpr int64_t kRows = kSequenceRows;
  static constexpr int64_t kWidth = 2 * kRows;  // staged values per segment sum
  struct Regs {
    T g_u;         // dL/du_t of the column, for the matvec adjoint of step t
    T pending;     // dL/dh_s through the rule of step s + 1 (the last sweep's row sums)
    T g_h;         // dL/dh_s through step s + 1, between D1 and D3
    T post_acc, eta_acc;  // dL/dpost_s, dL/deta_s of the column
    T alpha_neuron, alpha_scalar, rate;  // accumulated over all steps
  };
  int64_t steps, B, N, K, L;
  Modulation modulation;
  T clip;
  Span<const T> elig_rate, h0, hebb0, elig0, w, alpha, eta_fixed, h2mod_w, fanout_w, out, m,
      eta_seq, ckpt_h, ckpt_e, grad_out, grad_m;
  Span<const bool> clamp;
  Span<T> g_hebb, g_elig, g_u, g_x, g_h0, g_z, g_eta_seq, g_eta_post, g_alpha_acc, g_eta_conn,
      g_rate_acc, seg_h, seg_e;

  BP_KERNEL int64_t grid() const { return B; }
  BP_KERNEL int block() const { return sequence_threads(N); }
  BP_KERNEL int64_t shared_size() const { return sequence_backward_shared(N, has_elig<R>()); }
  BP_KERNEL int64_t chunks() const { return (N + kRows - 1) / kRows; }
  BP_KERNEL int64_t sweep_phases() const { return 2 * chunks() + 1; }
  BP_KERNEL int64_t iteration_phases() const {
    return sweep_phases() + (modulation == Modulation::None ? 1 : 3);
  }
  BP_KERNEL int phases() const {
    return static_cast<int>(1 + (steps + 1) * iteration_phases() + 2);
  }

  // Shared memory, in this order.
  struct Shared {
    Span<T> g_hebb, g_elig, staged, segments, g_in, g_pre, g_eta;
  };
  BP_KERNEL Shared shared(Span<T> smem, int threads) const {
    const int64_t NN = N * N;
    Shared s;
    int64_t at = 0;
    s.g_hebb = smem.sub(at, NN); at += NN;
    if constexpr (has_elig<R>()) { s.g_elig = smem.sub(at, NN); at += NN; }
    s.staged = smem.sub(at, 2 * kRows * (threads + 1)); at += 2 * kRows * (threads + 1);
    s.segments = smem.sub(at, threads); at += threads;
    s.g_in = smem.sub(at, N); at += N;
    s.g_pre = smem.sub(at, N); at += N;
    s.g_eta = smem.sub(at, N);
    return s;
  }

  // h_t of sample b, element i (h_0 for t = 0).
  BP_KERNEL T h_at(int64_t t, int64_t b, int64_t i) const {
    return t == 0 ? h0[b * N + i] : out[((t - 1) * B + b) * N + i];
  }
  // Element `at` (= i N + j) of sample b's trace t of a segment in memory: the initial trace, a
  // checkpoint, or a recomputed one.
  BP_KERNEL T trace_at(const Span<const T>& initial, const Span<const T>& checkpoints,
                       const Span<T>& segment, int64_t t, int64_t b, int64_t at) const {
    const int64_t NN = N * N;
    if (t == 0) return initial[b * NN + at];
    if (t % L == 0) return checkpoints[((t / L - 1) * B + b) * NN + at];
    return segment[((t % L - 1) * B + b) * NN + at];
  }
  BP_KERNEL T eta_at(int64_t t, int64_t b, int64_t i, int64_t j) const {
    if (modulation != Modulation::None) return eta_seq[((t - 1) * B + b) * N + j];
    return EM == EtaMode::PerPost ? eta_fixed[b * N + j] : eta_fixed[i * N + j];
  }

  BP_KERNEL void run(int phase, const ThreadPos& pos, Regs& reg, Span<T> smem) const {
    const int64_t b = pos.block, j = pos.thread, NN = N * N;
    const Shared sh = shared(smem, pos.block_dim);
    const RuleConsts<T> consts{clip, has_elig<R>() ? elig_rate[0] : T(0)};
    const int64_t last = phases() - 2;
    if (phase == 0) {
      if (j >= N) return;
      for (int64_t i = 0; i < N; ++i) {
        sh.g_hebb[i * N + j] = g_hebb[b * NN + i * N + j];
        if constexpr (has_elig<R>()) sh.g_elig[i * N + j] = g_elig[b * NN + i * N + j];
      }
      return;
    }
    if (phase == last) {
      if (j < N) {
        for (int64_t i = 0; i < N; ++i) {
          g_hebb[b * NN + i * N + j] = sh.g_hebb[i * N + j];
          if constexpr (has_elig<R>()) g_elig[b * NN + i * N + j] = sh.g_elig[i * N + j];
        }
        if constexpr (AM == AlphaMode::Neuron) g_alpha_acc[b * N + j] += reg.alpha_neuron;
      }
      sh.staged[j] = reg.alpha_scalar;
      sh.staged[pos.block_dim + j] = reg.rate;
      return;
    }
    if (phase == last + 1) {
      if (j != 0) return;
      T a = T(0), rate = T(0);
      for (int64_t k = 0; k < pos.block_dim; ++k) {
        a += sh.staged[k];
        rate += sh.staged[pos.block_dim + k];
      }
      if constexpr (AM == AlphaMode::Scalar) g_alpha_acc[b] += a;
      if constexpr (has_elig<R>()) g_rate_acc[b] += rate;
      return;
    }
    const int64_t it = (phase - 1) / iteration_phases(), sub = (phase - 1) % iteration_phases();
    const int64_t t = steps + 1 - it, s = t - 1;
    const int64_t n_chunks = chunks();
    if (sub < sweep_phases()) {
      const int64_t c = sub / 2;
      if (sub % 2 == 0 && c > 0) finish_row_sums(c - 1, pos, sh);
      if (sub % 2 == 0 && c < n_chunks) {
        if (c == 0) {
          reg.post_acc = T(0);
          reg.eta_acc = T(0);
          const bool new_segment = s >= 1 && (s == steps || s % L == 0);
          if (new_segment && j < N) load_segment((s - 1) / L, b, j, consts);
        }
        stage_chunk(c, t, s, b, j, consts, pos.block_dim, reg, sh);
      } else if (sub % 2 == 1) {
        segment_sums(j, pos.block_dim, sh);
      }
      return;
    }
    const int64_t d = sub - sweep_phases();
    const int64_t row = (s - 1) * B + b;  // (step s, sample) row of the (T, B, .) sequences
    if (d == 0) {  // matvec_done(t) and the first half of rule_done(s)
      if (j >= N) return;
      const T g_h = sh.g_in[j] + reg.pending;
      reg.pending = sh.g_pre[j];
      if (t == 1) g_h0[b * N + j] = g_h;
      if (s < 1) return;
      const T g_eta = reg.eta_acc;
      if constexpr (EM == EtaMode::PerPost) {
        if (modulation == Modulation::None) g_eta_post[b * N + j] += g_eta;
      }
      if (modulation == Modulation::Fanout) g_eta_seq[row * N + j] = g_eta;
      if (modulation == Modulation::None) {
        cell_backward(row, j, g_h, T(0), reg);
      } else {
        sh.g_eta[j] = g_eta;
        reg.g_h = g_h;
      }
      return;
    }
    if (s < 1) return;
    if (d == 1) {  // dL/dm_s through eta = m ("simple") or fanout(m), then through the tanh
      for (int64_t k = j; k < K; k += pos.block_dim) {
        T g_m = T(0);
        for (int64_t i = 0; i < N; ++i)
          g_m += modulation == Modulation::Simple ? sh.g_eta[i] : sh.g_eta[i] * fanout_w[i * K + k];
        if (!grad_m.empty()) g_m += grad_m[row * K + k];
        const T m_k = m[row * K + k];
        g_z[row * K + k] = g_m * (T(1) - m_k * m_k);
      }
      return;
    }
    if (j >= N) return;  // d == 2
    T g_mod_in = T(0);
    for (int64_t k = 0; k < K; ++k) g_mod_in += g_z[row * K + k] * h2mod_w[k * N + j];
    cell_backward(row, j, reg.g_h, g_mod_in, reg);
  }

  // dL/du_s = dL/dh_s (through the rule of step s, step s + 1, the output, the modulator) times
  // tanh'; clamped neurons pass it to x_s instead.
  BP_KERNEL void cell_backward(int64_t row, int64_t j, T g_h, T g_mod_in, Regs& reg) const {
    T g = reg.post_acc + g_h;
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
    reg.g_u = gu;
  }

  // Recomputes segment k's traces H_{kL+1} .. H_{min(kL+L, T)-1} of column j into the scratch.
  BP_KERNEL void load_segment(int64_t k, int64_t b, int64_t j, const RuleConsts<T>& consts) const {
    const int64_t start = k * L, end = start + L < steps ? start + L : steps, NN = N * N;
    for (int64_t i = 0; i < N; ++i) {
      const int64_t at = i * N + j;
      T h = trace_at(hebb0, ckpt_h, seg_h, start, b, at);
      T e = has_elig<R>() ? trace_at(elig0, ckpt_e, seg_e, start, b, at) : T(0);
      for (int64_t t = start + 1; t < end; ++t) {
        T h_new, e_new = T(0);
        rule_forward<R>(h, e, h_at(t - 1, b, i), h_at(t, b, j), eta_at(t, b, i, j), consts,
                        h_new, e_new);
        h = h_new;
        e = e_new;
        const int64_t slot = ((t - start - 1) * B + b) * NN + at;
        seg_h[slot] = h;
        if constexpr (has_elig<R>()) seg_e[slot] = e;
      }
    }
  }

  // Phase X of chunk c: the adjoints of rows c kRows .. of column j, each thread's contributions
  // to the row sums staged as (kind: 0 dL/dx of the matvec, 1 dL/dpre of the rule, row, thread).
  BP_KERNEL void stage_chunk(int64_t c, int64_t t, int64_t s, int64_t b, int64_t j,
                             const RuleConsts<T>& consts, int threads, Regs& reg,
                             const Shared& sh) const {
    const bool do_b = t <= steps, do_a = s >= 1;
    for (int64_t r = 0; r < kRows; ++r) {
      const int64_t i = c * kRows + r;
      T g_x = T(0), g_pre = T(0);
      if (i < N && j < N) {
        const int64_t at = i * N + j;
        T g = sh.g_hebb[at];
        if (do_b) {
          const T a = alpha_of<AM>(alpha, i, j, N), x = h_at(t - 1, b, i);
          const T h = trace_at(hebb0, ckpt_h, seg_h, t - 1, b, at);
          g_x = reg.g_u * (w[at] + a * h);
          const T g_a = reg.g_u * x * h;
          if constexpr (AM == AlphaMode::Full) g_alpha_acc[b * trace_size() + at] += g_a;
          if constexpr (AM == AlphaMode::Neuron) reg.alpha_neuron += g_a;
          if constexpr (AM == AlphaMode::Scalar) reg.alpha_scalar += g_a;
          g += reg.g_u * x * a;
        }
        if (do_a) {
          const T g_e = has_elig<R>() ? sh.g_elig[at] : T(0);
          const T e = has_elig<R>() ? trace_at(elig0, ckpt_e, seg_e, s - 1, b, at) : T(0);
          const RuleGrads<T> rg = rule_backward<R>(
              g, g_e, trace_at(hebb0, ckpt_h, seg_h, s - 1, b, at), e, h_at(s - 1, b, i),
              h_at(s, b, j), eta_at(s, b, i, j), consts);
          g = rg.hebb;
          if constexpr (has_elig<R>()) {
            sh.g_elig[at] = rg.elig;
            reg.rate += rg.elig_rate;
          }
          reg.post_acc += rg.post;
          if constexpr (EM == EtaMode::PerPost) reg.eta_acc += rg.eta;
          else g_eta_conn[b * trace_size() + at] += rg.eta;
          g_pre = rg.pre;
        }
        sh.g_hebb[at] = g;
      }
      sh.staged[r * (threads + 1) + j] = g_x;
      sh.staged[(kRows + r) * (threads + 1) + j] = g_pre;
    }
  }

  // Phase Y: thread q adds the kWidth staged values of segment q / (2 kRows) of sum q % (2 kRows)
  // (threads / kWidth segments per sum: exactly one task per thread). The staged rows are
  // threads + 1 apart, so that the 32 sums a warp reads at once lie in 32 different banks.
  BP_KERNEL void segment_sums(int64_t q, int threads, const Shared& sh) const {
    const int64_t sum = q % (2 * kRows), seg = q / (2 * kRows);
    T acc = T(0);
    for (int64_t k = 0; k < kWidth; ++k) acc += sh.staged[sum * (threads + 1) + seg * kWidth + k];
    sh.segments[q] = acc;
  }

  // The row sums of chunk c from the segments: dL/dx_i into g_in, dL/dpre_i into g_pre.
  BP_KERNEL void finish_row_sums(int64_t c, const ThreadPos& pos, const Shared& sh) const {
    const int64_t q = pos.thread;
    if (q >= 2 * kRows) return;
    const int64_t i = c * kRows + q % kRows;
    if (i >= N) return;
    const int64_t per_sum = pos.block_dim / kWidth;
    T acc = T(0);
    for (int64_t seg = 0; seg < per_sum; ++seg) acc += sh.segments[seg * 2 * kRows + q];
    (q < kRows ? sh.g_in : sh.g_pre)[i] = acc;
  }

  BP_KERNEL int64_t trace_size() const { return N * N; }
};

}  // namespace bp::kern
