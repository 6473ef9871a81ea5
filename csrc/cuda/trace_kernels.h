// The GPU trace passes (the same passes as trace_pass.h describes, for the GPU), as phased
// kernels (phased.h): compiled by nvcc for the device and by the host compiler for the emulator.
//
// Tiling: a block is (batch chunk, column tile, row block). Its kThreads threads own one column
// j each (coalesced trace rows) and walk the block's pre-synaptic rows i, the chunk's samples
// inside. The row blocks are what fills a large GPU at small B and N (B = 6, N = 1149: 1 x 9 x 30
// = 270 blocks); their partial sums over i go to per-row-block buffers that ColumnSumKernel adds
// in a fixed order, and sums over j (the adjoint of the matvec input and of the rule's pre term)
// go through shared memory, staged a few rows at a time. No atomics: every output element and
// every partial is owned by one thread, so results are bitwise reproducible.
#pragma once

#include <cstdint>

#include "../plastic_math.h"
#include "../trace_pass.h"
#include "phased.h"

namespace bp::kern {

constexpr int kThreads = 128;           // threads per block = columns per tile
constexpr int64_t kMaxChunk = 8;        // samples per batch chunk (per-thread arrays)
constexpr int64_t kStagePairs = 8;      // (row, sample) pairs whose row sums are staged at once
constexpr int64_t kTargetBlocks = 264;  // two waves on a 132-SM H100
// Blocks of kThreads that the per-step trace kernels compile for at once on an SM: 16 warps, so
// at most 128 registers a thread (csrc/cuda/NOTES.md, "Kernel resources").
constexpr int kTraceBlocksPerSM = 4;

struct GpuTiling {
  int64_t chunk_size, num_chunks;  // batch chunks
  int64_t num_tiles;               // column tiles of kThreads columns
  int64_t block_rows, num_row_blocks;
  int64_t stage_rows;  // rows per stage of the row sums

  BP_KERNEL int64_t blocks() const { return num_chunks * num_tiles * num_row_blocks; }
};

// Depends on the shapes only (determinism).
inline GpuTiling make_gpu_tiling(int64_t B, int64_t P, int64_t N) {
  GpuTiling t{};
  t.chunk_size = B < kMaxChunk ? B : kMaxChunk;
  t.num_chunks = (B + t.chunk_size - 1) / t.chunk_size;
  t.num_tiles = (N + kThreads - 1) / kThreads;
  const int64_t base = t.num_chunks * t.num_tiles;
  int64_t want = (kTargetBlocks + base - 1) / base;
  want = want < P ? want : P;
  t.block_rows = (P + want - 1) / want;
  t.num_row_blocks = (P + t.block_rows - 1) / t.block_rows;
  t.stage_rows = kStagePairs / t.chunk_size > 0 ? kStagePairs / t.chunk_size : 1;
  return t;
}

// Where a block works: samples [b0, b0 + nb), columns j0 + thread, rows [i0, i1).
struct BlockRange {
  int64_t chunk, tile, row_block, b0, nb, i0, i1;
};

BP_KERNEL BlockRange block_range(const GpuTiling& tl, int64_t B, int64_t P, int64_t block) {
  BlockRange r{};
  r.row_block = block % tl.num_row_blocks;
  r.tile = (block / tl.num_row_blocks) % tl.num_tiles;
  r.chunk = block / (tl.num_row_blocks * tl.num_tiles);
  r.b0 = r.chunk * tl.chunk_size;
  r.nb = B - r.b0 < tl.chunk_size ? B - r.b0 : tl.chunk_size;
  r.i0 = r.row_block * tl.block_rows;
  r.i1 = P < r.i0 + tl.block_rows ? P : r.i0 + tl.block_rows;
  return r;
}

template <AlphaMode AM, typename T>
BP_KERNEL T alpha_of(const Span<const T>& alpha, int64_t i, int64_t j, int64_t N) {
  if constexpr (AM == AlphaMode::Full) return alpha[i * N + j];
  if constexpr (AM == AlphaMode::Neuron) return alpha[j];
  return alpha[0];
}

template <EtaMode EM, typename T>
BP_KERNEL T eta_of(const Span<const T>& eta, int64_t b, int64_t i, int64_t j, int64_t N) {
  return EM == EtaMode::PerPost ? eta[b * N + j] : eta[i * N + j];
}

// The constants of rule R, elig_rate read where the kernel runs (retroactive only), so that no
// op copies it to the host.
template <Rule R, typename T>
BP_KERNEL RuleConsts<T> rule_consts(T clip, const Span<const T>& elig_rate) {
  return {clip, has_elig<R>() ? elig_rate[0] : T(0)};
}

// Forward pass: H_t = rule(H_{t-1}, ...) ("update") and the partial sums over the block's rows of
// u = x @ (w + A * H) ("matvec"), into u_partial (num_row_blocks, B, N).
template <typename T, Rule R, AlphaMode AM, EtaMode EM, bool UPDATE, bool MATVEC>
struct ForwardKernel {
  using Value = T;
  static constexpr int kMaxThreads = kThreads;
  static constexpr int kMinBlocksPerSM = kTraceBlocksPerSM;
  // Samples whose trace loads are issued together: the whole chunk (8 loads in flight per
  // thread), or half of it where the retroactive rule's update also loads E (the same 8).
  static constexpr int kGroup = UPDATE && has_elig<R>() ? kMaxChunk / 2 : kMaxChunk;
  struct Regs {
    T acc[kMaxChunk];
  };
  int64_t B, P, N;
  GpuTiling tl;
  Span<const T> hebb, elig, pre, post, eta, matvec_in, w, alpha;
  Span<T> hebb_out, elig_out, u_partial;
  Span<const T> elig_rate;  // (), retroactive only: read here, not on the host
  T clip;

  BP_KERNEL int64_t grid() const { return tl.blocks(); }
  BP_KERNEL int block() const { return kThreads; }
  BP_KERNEL int64_t shared_size() const { return 0; }
  BP_KERNEL int phases() const { return 1; }

  BP_KERNEL void run(int, const ThreadPos& pos, Regs& reg, Span<T>) const {
    const BlockRange r = block_range(tl, B, P, pos.block);
    const int64_t j = r.tile * kThreads + pos.thread;
    if (j >= N) return;
    const RuleConsts<T> consts = rule_consts<R>(clip, elig_rate);
    // The loops over the chunk's samples run to the constant kMaxChunk, unrolled, so that the
    // per-sample arrays stay in registers.
    BP_UNROLL
    for (int bb = 0; bb < kMaxChunk; ++bb) reg.acc[bb] = T(0);
    for (int64_t i = r.i0; i < r.i1; ++i) {
      const T w_ij = MATVEC ? w[i * N + j] : T(0);
      const T a_ij = MATVEC ? alpha_of<AM>(alpha, i, j, N) : T(0);
      // Every load of a group of the row's samples first, then the stores: the loads are all in
      // flight at once (hebb_out may alias hebb, so the compiler may not move a load above a
      // store). kGroup samples' trace values are live at once.
      BP_UNROLL
      for (int g = 0; g < kMaxChunk; g += kGroup) {
        T h[kGroup] = {}, e[kGroup] = {};
        BP_UNROLL
        for (int k = 0; k < kGroup; ++k) {
          if (g + k < r.nb) {
            const int64_t off = ((r.b0 + g + k) * P + i) * N + j;
            h[k] = hebb[off];
            if constexpr (UPDATE && has_elig<R>()) e[k] = elig[off];
          }
        }
        BP_UNROLL
        for (int k = 0; k < kGroup; ++k) {
          if (g + k < r.nb) {
            const int64_t b = r.b0 + g + k, off = (b * P + i) * N + j;
            if constexpr (UPDATE) {
              T e_new = T(0);
              rule_forward<R>(h[k], e[k], pre[b * P + i], post[b * N + j],
                              eta_of<EM>(eta, b, i, j, N), consts, h[k], e_new);
              hebb_out[off] = h[k];
              if constexpr (has_elig<R>()) elig_out[off] = e_new;
            }
            if constexpr (MATVEC)
              reg.acc[g + k] += matvec_in[b * P + i] * (w_ij + a_ij * trace_read<R>(h[k], consts));
          }
        }
      }
    }
    if constexpr (MATVEC) {
      BP_UNROLL
      for (int bb = 0; bb < kMaxChunk; ++bb)
        if (bb < r.nb) u_partial[(r.row_block * B + r.b0 + bb) * N + j] = reg.acc[bb];
    }
  }
};

// Backward pass: part B (adjoint of the matvec of step t) and part A (adjoint of the rule of
// step s) on each element, as trace_pass.h's BackwardPassParams describes. Outputs:
//   g_hebb, g_elig                updated in place
//   g_in_partial, g_pre_partial   (num_tiles, B, P): sums over the tile's columns
//   g_post_partial, g_eta_partial (num_row_blocks, B, N): sums over the row block's rows
//                                 (g_eta_partial: EtaMode::PerPost only)
//   g_eta_conn                    (num_chunks, P, N), accumulated (EtaMode::PerConnection)
//   g_alpha_acc                   accumulated; (num_chunks, P, N) full, (num_chunks *
//                                 num_row_blocks, N) per neuron, (blocks) scalar
//   g_rate_acc                    (blocks), accumulated
// Phases: per stage of stage_rows rows, (0) elementwise work, with each thread's contributions
// to the row sums put in shared memory, (1) and (2) a two-level fixed-order sum of them; then
// (3) the per-column results and (4) the block's totals of the scalar sums.
template <typename T, Rule R, AlphaMode AM, EtaMode EM, bool DO_B, bool DO_A>
struct BackwardKernel {
  using Value = T;
  static constexpr int kMaxThreads = kThreads;
  static constexpr int kMinBlocksPerSM = kTraceBlocksPerSM;
  static constexpr int kSegments = 8;  // first level of the row sums: kThreads / 16 values each
  static constexpr int64_t kMaxSums = 2 * kStagePairs;
  // Row strides of the staged values and of the segment sums, padded so that a warp's reads in
  // the sum phases fall in distinct shared-memory banks (a stride of kThreads put 16 threads on
  // one bank).
  static constexpr int64_t kStagedStride = kThreads + kSegments;
  static constexpr int64_t kSegmentStride = kSegments + 1;
  // The rule's per-(sample, column) sums over the rows, dL/dpost and dL/deta (per post neuron),
  // in shared memory, each thread its own slots: in registers, with the unrolled sample loop
  // they need, they and the samples' addresses held 200-255 registers a thread
  // (csrc/cuda/NOTES.md, "Kernel resources").
  static constexpr int64_t kColumnSumKinds = DO_A ? (EM == EtaMode::PerPost ? 2 : 1) : 0;
  static constexpr int64_t kColumnSums = kColumnSumKinds * kMaxChunk * kThreads;
  struct Regs {
    T alpha_neuron, alpha_scalar, rate;
  };
  int64_t B, P, N;
  GpuTiling tl;
  Span<T> g_hebb, g_elig;
  Span<const T> g_u, b_in, b_hebb, w, alpha;
  Span<const T> a_hebb, a_elig, a_pre, a_post, a_eta;
  Span<T> g_in_partial, g_pre_partial, g_post_partial, g_eta_partial, g_eta_conn, g_alpha_acc,
      g_rate_acc;
  Span<const T> elig_rate;  // (), retroactive only: read here, not on the host
  T clip;

  BP_KERNEL int64_t stages() const { return (tl.block_rows + tl.stage_rows - 1) / tl.stage_rows; }
  BP_KERNEL int64_t grid() const { return tl.blocks(); }
  BP_KERNEL int block() const { return kThreads; }
  BP_KERNEL int64_t shared_size() const {
    return kMaxSums * kStagedStride + kMaxSums * kSegmentStride + kColumnSums;
  }
  BP_KERNEL int phases() const { return static_cast<int>(3 * stages() + 2); }

  BP_KERNEL void run(int phase, const ThreadPos& pos, Regs& reg, Span<T> smem) const {
    const BlockRange r = block_range(tl, B, P, pos.block);
    const int tid = pos.thread;
    const int64_t j = r.tile * kThreads + tid;
    const int64_t pairs = tl.stage_rows * tl.chunk_size;  // row sums per kind in a stage
    const Span<T> staged = smem.sub(0, kMaxSums * kStagedStride);
    const Span<T> segments = smem.sub(kMaxSums * kStagedStride, kMaxSums * kSegmentStride);
    const ColumnSums column{smem.sub(kMaxSums * (kStagedStride + kSegmentStride), kColumnSums),
                            tid};
    const int64_t n_stage = stages();
    if (phase < 3 * n_stage) {
      const int64_t stage = phase / 3;
      const int64_t row0 = r.i0 + stage * tl.stage_rows;
      if (phase % 3 == 0) {
        if (stage == 0) {
          reg = Regs{};
          for (int64_t bb = 0; bb < tl.chunk_size; ++bb) {
            if constexpr (DO_A) column.post(bb) = T(0);
            if constexpr (DO_A && EM == EtaMode::PerPost) column.eta(bb) = T(0);
          }
        }
        compute_stage(r, j, tid, row0, pairs, reg, column, staged);
      } else if (phase % 3 == 1) {  // sum 16 staged values per (row sum, segment)
        if (tid < 2 * pairs * kSegments) {
          // Segment seg of row sum q: the values of threads seg, seg + kSegments, ...
          const int64_t q = tid / kSegments, seg = tid % kSegments;
          constexpr int64_t width = kThreads / kSegments;
          T s = T(0);
          for (int64_t k = 0; k < width; ++k) s += staged[q * kStagedStride + k * kSegments + seg];
          segments[q * kSegmentStride + seg] = s;
        }
      } else if (tid < 2 * pairs) {  // sum the segments; one thread per row sum
        T s = T(0);
        for (int64_t seg = 0; seg < kSegments; ++seg) s += segments[tid * kSegmentStride + seg];
        const int64_t kind = tid / pairs, rem = tid % pairs;
        const int64_t i = row0 + rem / tl.chunk_size, bb = rem % tl.chunk_size;
        if (i < r.i1 && bb < r.nb) {
          const int64_t at = (r.tile * B + r.b0 + bb) * P + i;
          if (kind == 0 && DO_B) g_in_partial[at] = s;
          if (kind == 1 && DO_A) g_pre_partial[at] = s;
        }
      }
      return;
    }
    if (phase == 3 * n_stage) {  // per-column results; scalar sums to shared memory
      if (j < N) {
        for (int64_t bb = 0; bb < r.nb; ++bb) {
          const int64_t at = (r.row_block * B + r.b0 + bb) * N + j;
          if constexpr (DO_A) g_post_partial[at] = column.post(bb);
          if constexpr (DO_A && EM == EtaMode::PerPost) g_eta_partial[at] = column.eta(bb);
        }
        if constexpr (DO_B && AM == AlphaMode::Neuron)
          g_alpha_acc[(r.chunk * tl.num_row_blocks + r.row_block) * N + j] += reg.alpha_neuron;
      }
      staged[tid] = reg.alpha_scalar;
      staged[kThreads + tid] = reg.rate;
      return;
    }
    if (tid == 0) {  // the block's totals, in thread order
      T a = T(0), rate = T(0);
      for (int k = 0; k < kThreads; ++k) {
        a += staged[k];
        rate += staged[kThreads + k];
      }
      if constexpr (DO_B && AM == AlphaMode::Scalar) g_alpha_acc[pos.block] += a;
      if constexpr (DO_A && has_elig<R>()) g_rate_acc[pos.block] += rate;
    }
  }

  // A thread's slots of the column sums: (kind: 0 = dL/dpost, 1 = dL/deta per post neuron) x
  // sample x thread.
  struct ColumnSums {
    Span<T> sums;
    int tid;
    BP_KERNEL T& post(int64_t bb) const { return sums[bb * kThreads + tid]; }
    BP_KERNEL T& eta(int64_t bb) const { return sums[(kMaxChunk + bb) * kThreads + tid]; }
  };

  // Phase 0 of a stage: rows [row0, row0 + stage_rows) x the chunk's samples. Staged layout:
  // (kind: 0 = dL/dx of the matvec, 1 = dL/dpre of the rule) x (row, sample) x thread.
  BP_KERNEL void compute_stage(const BlockRange& r, int64_t j, int tid, int64_t row0, int64_t pairs,
                               Regs& reg, const ColumnSums& column, const Span<T>& staged) const {
    for (int64_t k = 0; k < tl.stage_rows; ++k) {
      const int64_t i = row0 + k;
      const bool row_ok = i < r.i1 && j < N;
      T g_alpha_ij = T(0), g_eta_ij = T(0);
      for (int64_t bb = 0; bb < tl.chunk_size; ++bb) {
        T g_x = T(0), g_pre = T(0);
        if (row_ok && bb < r.nb)
          element(r.b0 + bb, i, j, bb, reg, column, g_x, g_pre, g_alpha_ij, g_eta_ij);
        const int64_t pair = k * tl.chunk_size + bb;
        staged[pair * kStagedStride + tid] = g_x;
        staged[(pairs + pair) * kStagedStride + tid] = g_pre;
      }
      if (!row_ok) continue;
      if constexpr (DO_B && AM == AlphaMode::Full)
        g_alpha_acc[(r.chunk * P + i) * N + j] += g_alpha_ij;
      if constexpr (DO_A && EM == EtaMode::PerConnection)
        g_eta_conn[(r.chunk * P + i) * N + j] += g_eta_ij;
    }
  }

  BP_KERNEL void element(int64_t b, int64_t i, int64_t j, int64_t bb, Regs& reg,
                         const ColumnSums& column, T& g_x, T& g_pre, T& g_alpha_ij,
                         T& g_eta_ij) const {
    const int64_t off = (b * P + i) * N + j;
    const RuleConsts<T> consts = rule_consts<R>(clip, elig_rate);
    T g = g_hebb[off];
    if constexpr (DO_B) {
      const T a = alpha_of<AM>(alpha, i, j, N), gu = g_u[b * N + j], x = b_in[b * P + i];
      const T h = b_hebb[off], h_read = trace_read<R>(h, consts);
      g_x = gu * (w[i * N + j] + a * h_read);
      const T g_a = gu * x * h_read;
      if constexpr (AM == AlphaMode::Full) g_alpha_ij += g_a;
      if constexpr (AM == AlphaMode::Neuron) reg.alpha_neuron += g_a;
      if constexpr (AM == AlphaMode::Scalar) reg.alpha_scalar += g_a;
      g += trace_read_backward<R>(gu * x * a, h, consts);
    }
    if constexpr (DO_A) {
      const T g_elig_out = has_elig<R>() ? g_elig[off] : T(0);
      const T e = has_elig<R>() ? a_elig[off] : T(0);
      const RuleGrads<T> rg =
          rule_backward<R>(g, g_elig_out, a_hebb[off], e, a_pre[b * P + i], a_post[b * N + j],
                           eta_of<EM>(a_eta, b, i, j, N), consts);
      g = rg.hebb;
      if constexpr (has_elig<R>()) {
        g_elig[off] = rg.elig;
        reg.rate += rg.elig_rate;
      }
      column.post(bb) += rg.post;
      if constexpr (EM == EtaMode::PerPost)
        column.eta(bb) += rg.eta;
      else
        g_eta_ij += rg.eta;
      g_pre = rg.pre;
    }
    g_hebb[off] = g;
  }
};

// dst[k] = sum over r of src[r * cols + k], rows in order: the fixed-order reduction of partial
// buffers.
template <typename T>
struct ColumnSumKernel {
  using Value = T;
  static constexpr int kMaxThreads = kThreads;
  struct Regs {};
  Span<const T> src;
  Span<T> dst;
  int64_t rows, cols;

  BP_KERNEL int64_t grid() const { return (cols + kThreads - 1) / kThreads; }
  BP_KERNEL int block() const { return kThreads; }
  BP_KERNEL int64_t shared_size() const { return 0; }
  BP_KERNEL int phases() const { return 1; }

  BP_KERNEL void run(int, const ThreadPos& pos, Regs&, Span<T>) const {
    const int64_t k = pos.block * kThreads + pos.thread;
    if (k < cols) dst[k] = column_sum(src, rows, cols, k);
  }
};

}  // namespace bp::kern
