// CPU kernels behind the reuse:: ops (see runtime/kernels.py for the plain-PyTorch twins,
// which define the semantics; tests compare the two and the naive reference).
//
// Geometry (13 int64, `geo`): Nb, Hp, Wp, C, kh, kw, sh, sw, dh, dw, L, Oh, Ow.
// xp is the padded channels-last input (Nb, Hp, Wp, C). Row n = (b, oh, ow) of the im2col
// matrix is anchored at pixel a(n) = (b*Hp + oh*sh)*Wp + ow*sw; tap t = (i, j) reads pixel
// a(n) + i*dh*Wp + j*dw. A "piece" (b, t, c0, len, e0) says that channels [c0, c0+len) of
// tap t sit at positions [e0, e0+len) of sub-vector (block) b.
//
// Parallelism: ATen's at::parallel_for (the same OpenMP pool and thread count as torch).
// Every kernel partitions its *outputs* among threads (blocks, slot ranges, output rows or
// pixels), or (the scatter-adds with fewer blocks than threads) gives each thread a private
// copy that is summed afterwards, so no two threads write the same memory and no atomics
// are needed.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

namespace {

struct Geo {
  int64_t Nb, Hp, Wp, C, kh, kw, sh, sw, dh, dw, L, Oh, Ow;
  int64_t N() const { return Nb * Oh * Ow; }
  int64_t P() const { return Nb * Hp * Wp; }
  int64_t anchor(int64_t n) const {
    const int64_t ow = n % Ow, r = n / Ow, oh = r % Oh, b = r / Oh;
    return (b * Hp + oh * sh) * Wp + ow * sw;
  }
  int64_t tap_offset(int64_t t) const { return (t / kw) * dh * Wp + (t % kw) * dw; }
};

Geo make_geo(const std::vector<int64_t>& g) {
  TORCH_CHECK(g.size() == 13, "reuse kernels: geometry needs 13 ints");
  return Geo{g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11], g[12]};
}

struct Piece {
  int64_t b, t, c0, len, e0;
};

// The unpadded input x (Nb, H, W, C) sits at rows [pt, pt + H) and columns [pl, pl + W) of
// the padded frame. Backward kernels given one (H >= 0) write x's gradient (Nb, H, W, C)
// instead of the padded one. H < 0: the padded frame itself.
struct Interior {
  int64_t pt = 0, pl = 0, H = -1, W = -1;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 1;  // element strides of x (Nb, H, W, C): any layout
};

std::vector<Piece> read_pieces(const torch::Tensor& pieces) {
  TORCH_CHECK(pieces.dtype() == torch::kInt64 && pieces.dim() == 2 && pieces.size(1) == 5,
              "reuse kernels: pieces must be an int64 (n, 5) tensor");
  auto p = pieces.contiguous();
  const int64_t* d = p.data_ptr<int64_t>();
  std::vector<Piece> out(p.size(0));
  for (int64_t i = 0; i < p.size(0); ++i) out[i] = {d[5 * i], d[5 * i + 1], d[5 * i + 2], d[5 * i + 3], d[5 * i + 4]};
  return out;
}

// Pieces grouped by tap: the pieces of tap t are order[tstart[t] .. tstart[t+1]).
struct TapIndex {
  std::vector<int64_t> tstart, order;
};

TapIndex index_by_tap(const std::vector<Piece>& pieces, int64_t taps) {
  TapIndex ix{std::vector<int64_t>(taps + 1, 0), std::vector<int64_t>(pieces.size())};
  for (const auto& q : pieces) ix.tstart[q.t + 1]++;
  for (int64_t t = 0; t < taps; ++t) ix.tstart[t + 1] += ix.tstart[t];
  std::vector<int64_t> fill(ix.tstart.begin(), ix.tstart.end() - 1);
  for (int64_t p = 0; p < (int64_t)pieces.size(); ++p) ix.order[fill[pieces[p].t]++] = p;
  return ix;
}

// For the padded pixel row `row` = (b, hp), call fn(piece, j, nrow) for every (tap, piece)
// that reads this row: tap t = (i, j) of output row oh = (hp - i*dh) / sh, whose first
// output position is nrow. The col2im backward kernels are built on this.
template <typename Fn>
inline void visit_row(const Geo& g, int64_t row, const std::vector<Piece>& pieces, const TapIndex& ix, Fn fn) {
  const int64_t b = row / g.Hp, hp = row % g.Hp;
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t hh = hp - i * g.dh;
    if (hh < 0 || hh % g.sh) continue;
    const int64_t oh = hh / g.sh;
    if (oh >= g.Oh) continue;
    const int64_t nrow = (b * g.Oh + oh) * g.Ow;
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t t = i * g.kw + j;
      for (int64_t p = ix.tstart[t]; p < ix.tstart[t + 1]; ++p) fn(pieces[ix.order[p]], j, nrow);
    }
  }
}

template <typename T>
inline void add_row(T* __restrict d, const T* __restrict s, int64_t len) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) d[k] += s[k];
}

// Fewer blocks than threads: the rows are cut into one range per thread, each range adds
// into its own zeroed copy of the (nb, cmax, M) output (the first range into the output
// itself), and the copies are summed at the end. Balanced however the rows spread over the
// slots (on the digits one all-zero slot holds most rows, which left one thread of the
// former slot-range split doing most of the work).
template <typename T, typename Fn>
void for_pairs_by_rows(int64_t nb, int64_t N, int64_t cmax, int64_t M, const int32_t* V, T* out, Fn fn) {
  const int64_t size = nb * cmax * M;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / 1024));
  std::vector<std::vector<T>> priv(chunks - 1);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      T* o = out;
      if (c) {
        priv[c - 1].assign(size, T(0));
        o = priv[c - 1].data();
      }
      const int64_t n0 = N * c / chunks, n1 = N * (c + 1) / chunks;
      for (int64_t b = 0; b < nb; ++b) {
        const int32_t* vb = V + b * N;
        for (int64_t n = n0; n < n1; ++n) fn(o, b, n, vb[n]);
      }
    }
  });
  if (chunks > 1)
    at::parallel_for(0, size, 4096, [&](int64_t i0, int64_t i1) {
      for (const auto& p : priv) add_row(out + i0, p.data() + i0, i1 - i0);
    });
}

void check_cpu_contig(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "reuse kernels: ", name, " must be a contiguous CPU tensor");
  if (std::string(name) == "inverse")
    TORCH_CHECK(t.scalar_type() == torch::kInt32, "reuse kernels: inverse must be int32");
}

}  // namespace

// ids (nb, N) -> per block, the distinct ids (per image segment of `seg` rows when
// seg < N) ranked ascending. Returns (inverse (nb, N) int32 local slots, counts (nb, Cmax),
// keys (nb, Cmax): each slot's id, -1 for empty slots).
std::vector<torch::Tensor> compact(torch::Tensor ids, int64_t H, int64_t seg) {
  check_cpu_contig(ids, "ids");
  TORCH_CHECK(ids.dtype() == torch::kInt64 && ids.dim() == 2, "compact: ids must be int64 (nb, N)");
  const int64_t nb = ids.size(0), N = ids.size(1);
  TORCH_CHECK(seg > 0 && N % seg == 0, "compact: segment length must divide N");
  auto inverse = torch::empty({nb, N}, ids.options().dtype(torch::kInt32));
  const int64_t* I = ids.data_ptr<int64_t>();
  int32_t* V = inverse.data_ptr<int32_t>();
  std::vector<std::vector<int64_t>> block_counts(nb), block_keys(nb);
  const bool dense = seg == N && H <= 20 && (int64_t(1) << H) <= std::max<int64_t>(4 * N, 4096);
  std::atomic<bool> out_of_range{false};
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> table, uniq;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t* ib = I + b * N;
      int32_t* vb = V + b * N;
      std::vector<int64_t>& cnt = block_counts[b];
      std::vector<int64_t>& key = block_keys[b];
      if (dense) {  // counting pass: a table over all 2^H ids
        // four tables taken in turn: runs of one id (the digits' background) made each
        // increment wait for the last one's store (conv2 L=64 H=8: 0.45 -> 0.37 ms)
        const int64_t S = int64_t(1) << H;
        table.assign(4 * S, 0);
        int64_t* t0 = table.data();
        // ids are masked into the table and any id past 2^H is reported (an error below)
        const uint64_t mask = static_cast<uint64_t>(S - 1);
        uint64_t high = 0;
        int64_t n = 0;
        for (; n + 4 <= N; n += 4) {
          const uint64_t i0 = ib[n], i1 = ib[n + 1], i2 = ib[n + 2], i3 = ib[n + 3];
          high |= (i0 | i1 | i2 | i3) & ~mask;
          t0[i0 & mask]++;
          t0[S + (i1 & mask)]++;
          t0[2 * S + (i2 & mask)]++;
          t0[3 * S + (i3 & mask)]++;
        }
        for (; n < N; ++n) {
          high |= static_cast<uint64_t>(ib[n]) & ~mask;
          t0[ib[n] & mask]++;
        }
        if (high) {
          out_of_range = true;
          continue;
        }
        for (int64_t id = 0; id < S; ++id) t0[id] += t0[S + id] + t0[2 * S + id] + t0[3 * S + id];
        table.resize(S);
        int64_t r = 0;
        for (int64_t id = 0; id < (int64_t)table.size(); ++id) {
          auto& c = table[id];
          if (c) {
            cnt.push_back(c);
            key.push_back(id);
            c = r++;
          } else {
            c = -1;
          }
        }
        for (int64_t n = 0; n < N; ++n) vb[n] = table[ib[n]];
      } else {  // sort the distinct ids of each segment; slots continue across segments
        for (int64_t s0 = 0; s0 < N; s0 += seg) {
          uniq.assign(ib + s0, ib + s0 + seg);
          std::sort(uniq.begin(), uniq.end());
          uniq.erase(std::unique(uniq.begin(), uniq.end()), uniq.end());
          const int64_t base = cnt.size();
          cnt.resize(base + uniq.size(), 0);
          key.insert(key.end(), uniq.begin(), uniq.end());
          for (int64_t n = s0; n < s0 + seg; ++n) {
            const int64_t r = std::lower_bound(uniq.begin(), uniq.end(), ib[n]) - uniq.begin();
            vb[n] = base + r;
            cnt[base + r]++;
          }
        }
      }
    }
  });
  TORCH_CHECK(!out_of_range, "compact: cluster ids must lie in [0, 2^H) with H = ", H,
              "; pass the H of the planes that hashed them");
  int64_t cmax = 0;
  for (auto& c : block_counts) cmax = std::max<int64_t>(cmax, c.size());
  auto counts = torch::zeros({nb, cmax}, ids.options());
  int64_t* C = counts.data_ptr<int64_t>();
  auto keys = torch::full({nb, cmax}, -1, ids.options());
  int64_t* Kp = keys.data_ptr<int64_t>();
  for (int64_t b = 0; b < nb; ++b) {
    std::copy(block_counts[b].begin(), block_counts[b].end(), C + b * cmax);
    std::copy(block_keys[b].begin(), block_keys[b].end(), Kp + b * cmax);
  }
  return {inverse, counts, keys};
}

namespace {
// ---------------------------------------------------------------------------------------
// Chunk fast path (L divides C, stride 1, "batch" scope). Block b = (tap t = b / nq,
// chunk q = b % nq) is channels [q*L, (q+1)*L) of one pixel, and all blocks of chunk q hash
// a pixel's chunk to the same id. So the members of block (t, q) are the pixels of tap t's
// window, and a cluster of block (t, q) is "the pixels of that window whose chunk-q id is
// k". The padded image splits into rectangular regions (row intervals x column intervals)
// inside which every pixel is covered by the same set of taps; a tap's window is a
// rectangle of regions, and the regions covering a pixel are a rectangle of taps. The
// forward sums every pixel chunk once into a (region, key) table and reads each block's
// sums off its 2D prefix; the backward sums the per-(tap, key) gradient shares over a 2D
// prefix of the tap grid and copies each pixel its region's share. Work: P*C plus tables
// of nq * regions * keys * L, instead of N*K (= taps x P*C) for the per-row kernels.
struct ChunkPlan {
  int64_t nq = 0, nh = 0, nw = 0, G = 0;
  std::vector<int64_t> rint, cint;  // padded row / column -> interval
  std::vector<int64_t> ri0, ri1, ci0, ci1;  // tap row i / column j -> covered interval range
  std::vector<int64_t> ilo, ihi, jlo, jhi;  // row / column interval -> covering tap range
  std::vector<int32_t> gmap;  // (nb, cmax): slot -> rank of its key among chunk q's keys, -1 if empty
  std::vector<int32_t> U;     // (P, nq): pixel chunk -> key rank, -1 if no block covers it
};

// Blocks are (tap, chunk) pairs in tap-major order, one piece each (any stride).
bool chunk_pieces(const Geo& g, const std::vector<Piece>& pieces, int64_t nb) {
  if (g.L <= 0 || g.C % g.L != 0) return false;
  const int64_t nq = g.C / g.L;
  if (nb != g.kh * g.kw * nq || (int64_t)pieces.size() != nb) return false;
  for (int64_t p = 0; p < nb; ++p) {
    const Piece& q = pieces[p];
    if (q.b != p || q.t != p / nq || q.c0 != (p % nq) * g.L || q.len != g.L || q.e0 != 0) return false;
  }
  return true;
}

bool chunk_layout(const Geo& g, const std::vector<Piece>& pieces, int64_t nb) {
  return g.sh == 1 && g.sw == 1 && chunk_pieces(g, pieces, nb);
}

// Intervals of one axis (stride 1): tap i covers [i*d, i*d + O) of the padded axis of length Pn.
// Only [r0, r1) is cut (the rest is the input's zero padding, whose pixels add nothing to a
// sum and need no gradient): positions outside map to -1, and each tap's range is its window
// clipped to [r0, r1). `split` - 1 more cuts at the quantiles of [r0, r1) let that many
// threads own equal shares of it.
void axis_intervals(int64_t Pn, int64_t k, int64_t d, int64_t O, int64_t r0, int64_t r1, int64_t split,
                    std::vector<int64_t>& of, std::vector<int64_t>& t0, std::vector<int64_t>& t1,
                    std::vector<int64_t>& lo, std::vector<int64_t>& hi, int64_t& n) {
  auto clip = [&](int64_t v) { return std::min(r1, std::max(r0, v)); };
  std::vector<int64_t> cuts{r0, r1};
  for (int64_t i = 0; i < k; ++i) {
    cuts.push_back(clip(i * d));
    cuts.push_back(clip(i * d + O));
  }
  for (int64_t s = 1; s < split; ++s) cuts.push_back(r0 + (r1 - r0) * s / split);
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  n = (int64_t)cuts.size() - 1;
  auto index = [&](int64_t v) { return std::lower_bound(cuts.begin(), cuts.end(), v) - cuts.begin(); };
  of.assign(Pn, -1);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t v = cuts[r]; v < cuts[r + 1]; ++v) of[v] = r;
  t0.resize(k);
  t1.resize(k);
  for (int64_t i = 0; i < k; ++i) {
    t0[i] = index(clip(i * d));
    t1[i] = index(clip(i * d + O));
  }
  lo.assign(n, 0);
  hi.assign(n, 0);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t v = cuts[r];
    int64_t a = k, b = 0;
    for (int64_t i = 0; i < k; ++i)
      if (i * d <= v && v < i * d + O) {
        a = std::min(a, i);
        b = std::max(b, i + 1);
      }
    lo[r] = a < b ? a : 0;
    hi[r] = a < b ? b : 0;
  }
}

// The plan's geometry: the layout check and the row / column intervals. With in.H >= 0, only
// the input's pixels (the interior of the padded frame) are planned for: the rest is zero
// padding.
bool chunk_geometry(ChunkPlan& cp, const Geo& g, const std::vector<Piece>& pieces, int64_t nb, int64_t mode,
                    const Interior& in) {
  if (mode == 2 || !chunk_layout(g, pieces, nb)) return false;
  cp.nq = g.C / g.L;
  const bool whole = in.H < 0;
  const int64_t h0 = whole ? 0 : in.pt, h1 = whole ? g.Hp : in.pt + in.H;
  const int64_t w0 = whole ? 0 : in.pl, w1 = whole ? g.Wp : in.pl + in.W;
  const int64_t split = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), h1 - h0));
  axis_intervals(g.Hp, g.kh, g.dh, g.Oh, h0, h1, split, cp.rint, cp.ri0, cp.ri1, cp.ilo, cp.ihi, cp.nh);
  axis_intervals(g.Wp, g.kw, g.dw, g.Ow, w0, w1, 1, cp.cint, cp.ci0, cp.ci1, cp.jlo, cp.jhi, cp.nw);
  return true;
}

// Mode 0 takes the chunk path only when its tables cost less than the per-row kernels.
bool chunk_affordable(const ChunkPlan& cp, const Geo& g, int64_t mode) {
  const int64_t table = cp.nq * std::max((cp.nh + 1) * (cp.nw + 1), (g.kh + 1) * (g.kw + 1)) * cp.G * g.L;
  return !(mode == 0 && (4 * table > g.N() * g.kh * g.kw * g.C || table > (int64_t(1) << 26)));
}

// The plan's geometry and the global key ranks of the slots' keys; returns false if the
// tables would cost more than the per-row kernels (mode 0) or the layout does not apply.
bool chunk_plan(ChunkPlan& cp, const Geo& g, const std::vector<Piece>& pieces, int64_t nb, int64_t cmax,
                const int64_t* keys, const int64_t* cnt, int64_t mode, const Interior& in) {
  if (!chunk_geometry(cp, g, pieces, nb, mode, in)) return false;
  int64_t kmax = -1;
  for (int64_t i = 0; i < nb * cmax; ++i) kmax = std::max(kmax, keys[i]);
  cp.gmap.assign(nb * cmax, -1);
  if (kmax < (int64_t(1) << 22)) {  // small ids (H <= 22): rank them with a table
    std::vector<int32_t> rank(kmax + 1);
    for (int64_t q = 0; q < cp.nq; ++q) {
      std::fill(rank.begin(), rank.end(), 0);
      for (int64_t b = q; b < nb; b += cp.nq)
        for (int64_t s = 0; s < cmax; ++s)
          if (cnt[b * cmax + s] > 0) rank[keys[b * cmax + s]] = 1;
      int32_t r = 0;
      for (auto& v : rank) v = v ? r++ : -1;
      cp.G = std::max<int64_t>(cp.G, r);
      for (int64_t b = q; b < nb; b += cp.nq)
        for (int64_t s = 0; s < cmax; ++s)
          if (cnt[b * cmax + s] > 0) cp.gmap[b * cmax + s] = rank[keys[b * cmax + s]];
    }
  } else {
    std::vector<std::vector<int64_t>> uniq(cp.nq);
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t s = 0; s < cmax; ++s)
        if (cnt[b * cmax + s] > 0) uniq[b % cp.nq].push_back(keys[b * cmax + s]);
    for (auto& u : uniq) {
      std::sort(u.begin(), u.end());
      u.erase(std::unique(u.begin(), u.end()), u.end());
      cp.G = std::max<int64_t>(cp.G, u.size());
    }
    for (int64_t b = 0; b < nb; ++b) {
      const auto& u = uniq[b % cp.nq];
      for (int64_t s = 0; s < cmax; ++s)
        if (cnt[b * cmax + s] > 0)
          cp.gmap[b * cmax + s] = std::lower_bound(u.begin(), u.end(), keys[b * cmax + s]) - u.begin();
    }
  }
  return chunk_affordable(cp, g, mode);
}

// U[p, q]: the key rank of pixel p's chunk q, read from one block that covers it (all agree:
// the first covering tap of its row and column intervals); -1 outside the planned intervals
// or where no block covers the pixel.
void chunk_pixel_keys(ChunkPlan& cp, const Geo& g, const int32_t* V, int64_t cmax) {
  const int64_t N = g.N(), nq = cp.nq;
  cp.U.assign(g.P() * nq, -1);
  at::parallel_for(0, g.Nb * g.Hp, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t bb = row / g.Hp, hp = row % g.Hp, ri = cp.rint[hp];
      if (ri < 0 || cp.ihi[ri] <= cp.ilo[ri]) continue;
      const int64_t i = cp.ilo[ri], oh = hp - i * g.dh;
      for (int64_t wp = 0; wp < g.Wp; ++wp) {
        const int64_t ci = cp.cint[wp];
        if (ci < 0 || cp.jhi[ci] <= cp.jlo[ci]) continue;
        const int64_t j = cp.jlo[ci], n = (bb * g.Oh + oh) * g.Ow + wp - j * g.dw;
        int32_t* u = cp.U.data() + (row * g.Wp + wp) * nq;
        for (int64_t q = 0; q < nq; ++q) {
          const int64_t b = (i * g.kw + j) * nq + q;
          u[q] = cp.gmap[b * cmax + V[b * N + n]];
        }
      }
    }
  });
}

// In-place 2D prefix sums over an (A+1) x (B+1) grid of vectors of length E per q (row and
// column 0 are zero); threads own ranges of the vector.
template <typename T>
void prefix2d(T* Tb, int64_t nq, int64_t A, int64_t B, int64_t E) {
  at::parallel_for(0, E, 256, [&](int64_t e0, int64_t e1) {
    for (int64_t q = 0; q < nq; ++q) {
      T* base = Tb + q * (A + 1) * (B + 1) * E;
      for (int64_t a = 1; a <= A; ++a)
        for (int64_t c = 1; c <= B; ++c) {
          T* d = base + (a * (B + 1) + c) * E;
          const T* up = d - (B + 1) * E;
          const T* left = d - E;
          const T* diag = up - E;
#pragma omp simd
          for (int64_t k = e0; k < e1; ++k) d[k] += up[k] + left[k] - diag[k];
        }
    }
  });
}

// out[k] = sum of the grid cells [a0, a1) x [c0, c1) (from the prefix), scaled by f.
template <typename T>
inline void rect(T* __restrict out, const T* Tq, int64_t B, int64_t E, int64_t a0, int64_t a1, int64_t c0, int64_t c1,
                 int64_t off, int64_t len, T f) {
  const T* p11 = Tq + (a1 * (B + 1) + c1) * E + off;
  const T* p01 = Tq + (a0 * (B + 1) + c1) * E + off;
  const T* p10 = Tq + (a1 * (B + 1) + c0) * E + off;
  const T* p00 = Tq + (a0 * (B + 1) + c0) * E + off;
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) out[k] = f * (p11[k] - p01[k] - p10[k] + p00[k]);
}

template <typename T>
void chunk_means_impl(const T* X, const int64_t* cnt, T* S, const Geo& g, const ChunkPlan& cp, int64_t nb,
                      int64_t cmax) {
  const int64_t L = g.L, C = g.C, nq = cp.nq, nh = cp.nh, nw = cp.nw, G = cp.G, E = G * L;
  const int64_t cells = (nh + 1) * (nw + 1);
  std::vector<T> R(nq * cells * E, T(0));
  // every pixel chunk once into its region's row of the table. A task is a (q, row interval)
  // and owns its table rows; the tasks are dealt to the threads by their rows (the row cuts
  // at the quantiles make the shares equal), not by their count.
  std::vector<int64_t> start(nq * nh + 1, 0);
  for (int64_t task = 0; task < nq * nh; ++task) {
    int64_t rows = 0;
    for (int64_t hp = 0; hp < g.Hp; ++hp) rows += cp.rint[hp] == task % nh;
    start[task + 1] = start[task] + rows;
  }
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nq * nh));
  at::parallel_for(0, nt, 1, [&](int64_t th0, int64_t th1) {
    for (int64_t task = 0; task < nq * nh; ++task) {
      const int64_t owner = std::min(nt - 1, start[task] * nt / std::max<int64_t>(start.back(), 1));
      if (owner < th0 || owner >= th1) continue;
      const int64_t q = task / nh, ri = task % nh;
      T* Rq = R.data() + q * cells * E;
      for (int64_t bb = 0; bb < g.Nb; ++bb)
        for (int64_t hp = 0; hp < g.Hp; ++hp) {
          if (cp.rint[hp] != ri) continue;
          const int64_t p0 = (bb * g.Hp + hp) * g.Wp;
          for (int64_t wp = 0; wp < g.Wp; ++wp) {
            const int64_t p = p0 + wp, k = cp.U[p * nq + q];
            if (k < 0) continue;
            add_row(Rq + ((ri + 1) * (nw + 1) + cp.cint[wp] + 1) * E + k * L, X + p * C + q * L, L);
          }
        }
    }
  });
  prefix2d(R.data(), nq, nh, nw, E);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t q = b % nq, t = b / nq, i = t / g.kw, j = t % g.kw;
      const T* Rq = R.data() + q * cells * E;
      for (int64_t s = 0; s < cmax; ++s) {
        T* out = S + (b * cmax + s) * L;
        const int64_t c = cnt[b * cmax + s], k = cp.gmap[b * cmax + s];
        if (c == 0 || k < 0) {
          std::fill(out, out + L, T(0));
          continue;
        }
        rect(out, Rq, nw, E, cp.ri0[i], cp.ri1[i], cp.ci0[j], cp.ci1[j], k * L, L, T(1) / T(c));
      }
    }
  });
}

template <typename T>
void chunk_means_backward_impl(const T* Gc, const int64_t* cnt, T* D, const Geo& g, const ChunkPlan& cp, int64_t nb,
                               int64_t cmax, Interior in = {}) {
  const int64_t L = g.L, C = g.C, nq = cp.nq, nh = cp.nh, nw = cp.nw, G = cp.G, E = G * L;
  const int64_t kh = g.kh, kw = g.kw, tcells = (kh + 1) * (kw + 1), rcells = nh * nw;
  std::vector<T> PT(nq * tcells * E, T(0));
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {  // each block's shares, by key
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t q = b % nq, t = b / nq, i = t / kw, j = t % kw;
      T* cell = PT.data() + (q * tcells + (i + 1) * (kw + 1) + j + 1) * E;
      for (int64_t s = 0; s < cmax; ++s) {
        const int64_t c = cnt[b * cmax + s], k = cp.gmap[b * cmax + s];
        if (c == 0 || k < 0) continue;
        const T f = T(1) / T(c);
        const T* src = Gc + (b * cmax + s) * L;
        T* d = cell + k * L;
        for (int64_t e = 0; e < L; ++e) d[e] = f * src[e];
      }
    }
  });
  prefix2d(PT.data(), nq, kh, kw, E);
  std::vector<T> Z(nq * rcells * E);  // per region, the sum of the covering taps' shares
  at::parallel_for(0, nq * rcells, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t q = r / rcells, ri = (r % rcells) / nw, ci = r % nw;
      rect(Z.data() + r * E, PT.data() + q * tcells * E, kw, E, cp.ilo[ri], cp.ihi[ri], cp.jlo[ci], cp.jhi[ci], 0, E,
           T(1));
    }
  });
  const bool padded = in.H < 0;
  const int64_t w_lo = padded ? 0 : in.pl, w_hi = padded ? g.Wp : in.pl + in.W;
  at::parallel_for(0, g.Nb * g.Hp, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t row = w0; row < w1; ++row) {
      const int64_t hp = row % g.Hp, ri = cp.rint[hp];
      if (!padded && (hp < in.pt || hp >= in.pt + in.H)) continue;
      T* out = padded ? D + row * g.Wp * C : D + (row / g.Hp * in.H + hp - in.pt) * in.W * C;
      for (int64_t wp = w_lo; wp < w_hi; ++wp) {
        const int64_t p = row * g.Wp + wp;
        for (int64_t q = 0; q < nq; ++q) {
          T* d = out + (wp - w_lo) * C + q * L;
          const int64_t k = cp.U[p * nq + q];
          if (k < 0)
            std::fill(d, d + L, T(0));
          else
            std::memcpy(d, Z.data() + ((q * rcells + ri * nw + cp.cint[wp]) * G + k) * L, sizeof(T) * L);
        }
      }
    }
  });
}

// The chunk path's plan, with every pixel chunk's key rank, when keys are given and the path
// applies (mode as for centroid_means); false: take the per-row kernels.
bool chunk_path(ChunkPlan& cp, const Geo& g, const std::vector<Piece>& pieces, int64_t nb, int64_t cmax,
                const c10::optional<torch::Tensor>& keys, const torch::Tensor& counts, const torch::Tensor& inverse,
                int64_t mode, const Interior& in) {
  if (!keys.has_value()) return false;
  check_cpu_contig(*keys, "keys");
  if (!chunk_plan(cp, g, pieces, nb, cmax, keys->data_ptr<int64_t>(), counts.data_ptr<int64_t>(), mode, in))
    return false;
  chunk_pixel_keys(cp, g, inverse.data_ptr<int32_t>(), cmax);
  return true;
}

}  // namespace

// keys[b, s]: the hash id of slot s of block b (-1 for empty slots).
torch::Tensor slot_keys(torch::Tensor ids, torch::Tensor inverse, int64_t cmax) {
  check_cpu_contig(ids, "ids");
  check_cpu_contig(inverse, "inverse");
  const int64_t nb = inverse.size(0), N = inverse.size(1);
  auto keys = torch::full({nb, cmax}, -1, ids.options());
  const int64_t* I = ids.data_ptr<int64_t>();
  const int32_t* V = inverse.data_ptr<int32_t>();
  int64_t* K = keys.data_ptr<int64_t>();
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t n = 0; n < N; ++n) K[b * cmax + V[b * N + n]] = I[b * N + n];
  });
  return keys;
}

// Per slot, the mean of its members' sub-vectors: (nb, Cmax, L). Each thread owns whole
// blocks, zeroes its part of the output, accumulates, and divides by the slot's count; with
// fewer blocks than threads, or a few small ones, the rows are split into private sums
// (for_pairs_by_rows).
template <typename T>
void centroid_means_impl(const T* X, const int32_t* V, const int64_t* cnt, T* S, const Geo& g,
                         const std::vector<Piece>& pieces, const std::vector<int64_t>& start, int64_t nb,
                         int64_t cmax) {
  const int64_t N = g.N(), C = g.C, L = g.L;
  auto finish = [&](int64_t b, int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t c = cnt[b * cmax + s];
      if (c > 1) {
        const T inv = T(1) / T(c);
        T* row = S + (b * cmax + s) * L;
        for (int64_t k = 0; k < L; ++k) row[k] *= inv;
      }
    }
  };
  // A few blocks (fewer than 4 per thread) with small tables go by rows too: whole blocks
  // left threads unevenly loaded (5 blocks on 2 threads) and were measured slower (conv1
  // L=5: 5.4 -> 3.0 ms, conv2 L=320: 2.2 -> 1.7 ms; L=32's 50 blocks stay by blocks).
  const int64_t nth = at::get_num_threads();
  const bool few = nb < 4 * nth && nb * cmax * L * (int64_t)sizeof(T) <= (int64_t(2) << 20);
  if (nb >= nth && !few) {  // each thread owns whole blocks; rows in tiles of
    // TILE, the thread's blocks inside a tile, so the tile's input pixels and the current
    // block's table stay in cache
    constexpr int64_t TILE = 512;
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      std::memset(S + b0 * cmax * L, 0, sizeof(T) * (b1 - b0) * cmax * L);
      std::vector<int64_t> anchors(TILE);
      for (int64_t n0 = 0; n0 < N; n0 += TILE) {
        const int64_t n1 = std::min(N, n0 + TILE);
        for (int64_t n = n0; n < n1; ++n) anchors[n - n0] = g.anchor(n);
        for (int64_t b = b0; b < b1; ++b) {
          const int32_t* vb = V + b * N;
          T* sb = S + b * cmax * L;
          for (int64_t p = start[b]; p < start[b + 1]; ++p) {
            const Piece& q = pieces[p];
            const T* src = X + g.tap_offset(q.t) * C + q.c0;
            for (int64_t n = n0; n < n1; ++n) add_row(sb + vb[n] * L + q.e0, src + anchors[n - n0] * C, q.len);
          }
        }
      }
      for (int64_t b = b0; b < b1; ++b) finish(b, 0, cmax);
    });
    return;
  }
  // fewer blocks than threads (or a few small ones): rows split among threads into private
  // sums (see for_pairs_by_rows), then every slot divided by its count
  std::memset(S, 0, sizeof(T) * nb * cmax * L);
  for_pairs_by_rows(nb, N, cmax, L, V, S, [&](T* o, int64_t b, int64_t n, int64_t s) {
    const int64_t a = g.anchor(n);
    T* dst = o + (b * cmax + s) * L;
    for (int64_t p = start[b]; p < start[b + 1]; ++p) {
      const Piece& q = pieces[p];
      add_row(dst + q.e0, X + (a + g.tap_offset(q.t)) * C + q.c0, q.len);
    }
  });
  at::parallel_for(0, cmax, 64, [&](int64_t s0, int64_t s1) {
    for (int64_t b = 0; b < nb; ++b) finish(b, s0, s1);
  });
}

// keys (the slots' hash ids, optional) enable the chunk fast path; mode 0 picks it when its
// tables are cheaper than the per-row pass, 1 whenever it applies, 2 never. With H >= 0, xp is
// zero outside rows [pt, pt + H) and columns [pl, pl + W) (the input inside its zero padding),
// and the chunk path skips those pixels.
torch::Tensor centroid_means(torch::Tensor xp, torch::Tensor inverse, torch::Tensor counts, std::vector<int64_t> geo,
                             torch::Tensor pieces_t, c10::optional<torch::Tensor> keys, int64_t mode, int64_t pt,
                             int64_t pl, int64_t H, int64_t W) {
  check_cpu_contig(xp, "xp");
  check_cpu_contig(inverse, "inverse");
  check_cpu_contig(counts, "counts");
  const Geo g = make_geo(geo);
  const auto pieces = read_pieces(pieces_t);
  const int64_t nb = inverse.size(0), cmax = counts.size(1);
  const Interior in{pt, pl, H, W};
  TORCH_CHECK(in.H < 0 || (in.pt >= 0 && in.pl >= 0 && in.W >= 0 && in.pt + in.H <= g.Hp && in.pl + in.W <= g.Wp),
              "centroid_means: the input must lie inside the padded frame");
  auto S = torch::empty({nb, cmax, g.L}, xp.options());
  ChunkPlan cp;
  if (chunk_path(cp, g, pieces, nb, cmax, keys, counts, inverse, mode, in)) {
    AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "centroid_means_chunk", [&] {
      chunk_means_impl<scalar_t>(xp.data_ptr<scalar_t>(), counts.data_ptr<int64_t>(), S.data_ptr<scalar_t>(), g, cp,
                                 nb, cmax);
    });
    return S;
  }
  std::vector<int64_t> start(nb + 1, 0);
  for (const auto& q : pieces) start[q.b + 1]++;
  for (int64_t b = 0; b < nb; ++b) start[b + 1] += start[b];
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "centroid_means", [&] {
    centroid_means_impl<scalar_t>(xp.data_ptr<scalar_t>(), inverse.data_ptr<int32_t>(), counts.data_ptr<int64_t>(),
                                  S.data_ptr<scalar_t>(), g, pieces, start, nb, cmax);
  });
  return S;
}

// Backward of the centroid means w.r.t. xp: every member row n of slot s gets
// g_cent[b, s] / count[b, s], added into the pixels its sub-vector came from (col2im).
// Each thread owns a range of padded pixel rows (b, hp) and writes only those; for a
// (tap, piece) the output row's inverse entries are read sequentially along ow.
template <typename T>
void centroid_means_backward_impl(const T* Gc, const int32_t* V, const int64_t* cnt, T* D, const Geo& g,
                                  const std::vector<Piece>& pieces, const TapIndex& ix, int64_t cmax,
                                  Interior in = {}) {
  const int64_t N = g.N(), C = g.C, L = g.L;
  const bool padded = in.H < 0;
  at::parallel_for(0, g.Nb * g.Hp, 1, [&](int64_t r0, int64_t r1) {
    std::vector<T> buf(padded ? 0 : g.Wp * C);  // the padded row, of which x's part is kept
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t hp = row % g.Hp;
      if (!padded && (hp < in.pt || hp >= in.pt + in.H)) continue;
      T* drow = padded ? D + row * g.Wp * C : buf.data();
      std::memset(drow, 0, sizeof(T) * g.Wp * C);
      visit_row(g, row, pieces, ix, [&](const Piece& q, int64_t j, int64_t nrow) {
        const int32_t* vrow = V + q.b * N + nrow;
        const int64_t* crow = cnt + q.b * cmax;
        const T* gb = Gc + q.b * cmax * L + q.e0;
        for (int64_t ow = 0; ow < g.Ow; ++ow) {
          const int64_t s = vrow[ow];
          const T f = T(1) / T(crow[s]);
          T* d = drow + (ow * g.sw + j * g.dw) * C + q.c0;
          const T* src = gb + s * L;
#pragma omp simd
          for (int64_t k = 0; k < q.len; ++k) d[k] += f * src[k];
        }
      });
      if (!padded)
        std::memcpy(D + (row / g.Hp * in.H + hp - in.pt) * in.W * C, drow + in.pl * C, sizeof(T) * in.W * C);
    }
  });
}

// With H >= 0, only the unpadded input at (pt, pl) of the padded frame gets its gradient,
// (Nb, C, H, W) channels-last; with H < 0, the padded frame (Nb, Hp, Wp, C).
torch::Tensor centroid_means_backward(torch::Tensor g_cent, torch::Tensor inverse, torch::Tensor counts,
                                      std::vector<int64_t> geo, torch::Tensor pieces_t,
                                      c10::optional<torch::Tensor> keys, int64_t mode, int64_t pt, int64_t pl,
                                      int64_t H, int64_t W) {
  check_cpu_contig(g_cent, "g_cent");
  check_cpu_contig(inverse, "inverse");
  check_cpu_contig(counts, "counts");
  const Geo g = make_geo(geo);
  const auto pieces = read_pieces(pieces_t);
  const int64_t nb = inverse.size(0), cmax = g_cent.size(1);
  const Interior in{pt, pl, H, W};
  TORCH_CHECK(in.H < 0 || (in.pt >= 0 && in.pl >= 0 && in.W >= 0 && in.pt + in.H <= g.Hp && in.pl + in.W <= g.Wp),
              "centroid_means_backward: the input must lie inside the padded frame");
  // the input's gradient is allocated channels-last (Nb, C, H, W): (Nb, H, W, C) in memory, and
  // autograd can add other gradients into it in place
  auto D = in.H < 0 ? torch::empty({g.Nb, g.Hp, g.Wp, g.C}, g_cent.options())
                    : torch::empty({g.Nb, g.C, in.H, in.W}, g_cent.options().memory_format(at::MemoryFormat::ChannelsLast));
  ChunkPlan cp;
  if (chunk_path(cp, g, pieces, nb, cmax, keys, counts, inverse, mode, in)) {
    AT_DISPATCH_FLOATING_TYPES(g_cent.scalar_type(), "centroid_means_backward_chunk", [&] {
      chunk_means_backward_impl<scalar_t>(g_cent.data_ptr<scalar_t>(), counts.data_ptr<int64_t>(),
                                          D.data_ptr<scalar_t>(), g, cp, nb, cmax, in);
    });
    return D;
  }
  const TapIndex ix = index_by_tap(pieces, g.kh * g.kw);
  AT_DISPATCH_FLOATING_TYPES(g_cent.scalar_type(), "centroid_means_backward", [&] {
    centroid_means_backward_impl<scalar_t>(g_cent.data_ptr<scalar_t>(), inverse.data_ptr<int32_t>(),
                                           counts.data_ptr<int64_t>(), D.data_ptr<scalar_t>(), g, pieces, ix, cmax,
                                           in);
  });
  return D;
}

// The reconstruction (a gather-sum) works on column strips of NV 64-byte vectors (64 floats
// or 32 doubles per strip), keeping a strip of one output row in registers while it meets
// every block of a group; the groups are sized so that their centroid tables stay in L2
// (kTableBudget), and each thread's rows go through in tiles whose inverse (and scales)
// entries are first transposed to (row, block) order. Measured on conv2 (M = 64): 1.3-1.6x
// faster than a row-at-a-time add at L = 32, 2-3x at L = 8 (whose 200 tables of 155 KB
// thrashed the caches); see benchmarks/kernels_ab.py. (The scatter backwards keep a
// block-outer order, below: a register strip per gradient row was slower there.)
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int64_t W = 64 / sizeof(T);
};
constexpr int64_t NV = 4;                  // vectors per strip
constexpr int64_t kTableBudget = 1 << 20;  // bytes of centroid tables per block group (one L2)
constexpr int64_t kRowTile = 128;

template <typename T>
inline typename Vec<T>::type vload(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void vstore(T* p, typename Vec<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}
// How many blocks' tables of table_bytes each fit the budget (at least 1, at most nb).
inline int64_t block_group(int64_t nb, int64_t table_bytes, int64_t budget) {
  return std::max<int64_t>(1, std::min<int64_t>(nb, budget / std::max<int64_t>(table_bytes, 1)));
}

// (row, block) copies of V[b * N + n] (and W) for blocks [g0, g0 + gn) and rows [n0, n0 + nt).
template <typename T>
inline void transpose_tile(const int32_t* V, const T* W, int32_t* vt, T* wt, int64_t N, int64_t g0, int64_t gn,
                           int64_t n0, int64_t nt) {
  for (int64_t b = 0; b < gn; ++b) {
    const int32_t* vb = V + (g0 + b) * N + n0;
    for (int64_t i = 0; i < nt; ++i) vt[i * gn + b] = vb[i];
    if (W) {
      const T* wb = W + (g0 + b) * N + n0;
      for (int64_t i = 0; i < nt; ++i) wt[i * gn + b] = wb[i];
    }
  }
}

// y[n] = bias + sum_b w[b, n] * yc[b, inverse[b, n]] (w = 1 without scales): (N, M); each
// thread owns a range of rows.
// fill(vt, wt, g0, gn, n0, nt) writes the tile's slots (and scales, when `scaled`) in (row,
// block) order: transpose_tile for a per-(block, row) inverse, pixel lookups for the per-pixel
// chain (pixel_reconstruct); the sums are the same either way.
template <typename T, typename Fill>
void reconstruct_tiles(const T* Y, Fill fill, bool scaled, const T* bias, T* out, int64_t nb, int64_t cmax, int64_t N,
                       int64_t M) {
  using VT = typename Vec<T>::type;
  constexpr int64_t VW = Vec<T>::W, CW = NV * VW;
  const int64_t GB = block_group(nb, cmax * M * (int64_t)sizeof(T), kTableBudget);
  at::parallel_for(0, N, kRowTile, [&](int64_t r0, int64_t r1) {
    std::vector<int32_t> vt(kRowTile * GB);
    std::vector<T> wt(scaled ? kRowTile * GB : 0);
    for (int64_t g0 = 0; g0 < nb; g0 += GB) {
      const int64_t gn = std::min(GB, nb - g0);
      for (int64_t n0 = r0; n0 < r1; n0 += kRowTile) {
        const int64_t nt = std::min(kRowTile, r1 - n0);
        fill(vt.data(), wt.data(), g0, gn, n0, nt);
        const T* Yg = Y + g0 * cmax * M;
        for (int64_t c0 = 0; c0 < M; c0 += CW) {
          const int64_t cw = std::min(CW, M - c0);
          for (int64_t i = 0; i < nt; ++i) {
            T* d = out + (n0 + i) * M + c0;
            const int32_t* vi = vt.data() + i * gn;
            const T* wi = scaled ? wt.data() + i * gn : nullptr;
            if (cw == CW) {
              VT a[NV];
              for (int64_t v = 0; v < NV; ++v)
                a[v] = g0 ? vload(d + v * VW) : (bias ? vload(bias + c0 + v * VW) : VT{});
              for (int64_t b = 0; b < gn; ++b) {
                const T* s = Yg + (b * cmax + vi[b]) * M + c0;
                if (wi) {
                  const T f = wi[b];
                  for (int64_t v = 0; v < NV; ++v) a[v] += f * vload(s + v * VW);
                } else {
                  for (int64_t v = 0; v < NV; ++v) a[v] += vload(s + v * VW);
                }
              }
              for (int64_t v = 0; v < NV; ++v) vstore(d + v * VW, a[v]);
            } else {  // the last, narrower strip
              T a[CW];
              for (int64_t k = 0; k < cw; ++k) a[k] = g0 ? d[k] : (bias ? bias[c0 + k] : T(0));
              for (int64_t b = 0; b < gn; ++b) {
                const T* s = Yg + (b * cmax + vi[b]) * M + c0;
                const T f = wi ? wi[b] : T(1);
                for (int64_t k = 0; k < cw; ++k) a[k] += f * s[k];
              }
              for (int64_t k = 0; k < cw; ++k) d[k] = a[k];
            }
          }
        }
      }
    }
  });
}

template <typename T>
void reconstruct_impl(const T* Y, const int32_t* V, const T* bias, const T* W, T* out, int64_t nb, int64_t cmax,
                      int64_t N, int64_t M) {
  auto fill = [&](int32_t* vt, T* wt, int64_t g0, int64_t gn, int64_t n0, int64_t nt) {
    transpose_tile(V, W, vt, wt, N, g0, gn, n0, nt);
  };
  reconstruct_tiles(Y, fill, W != nullptr, bias, out, nb, cmax, N, M);
}

torch::Tensor reconstruct(torch::Tensor yc, torch::Tensor inverse, c10::optional<torch::Tensor> bias,
                          c10::optional<torch::Tensor> scales) {
  check_cpu_contig(yc, "yc");
  check_cpu_contig(inverse, "inverse");
  const int64_t nb = yc.size(0), cmax = yc.size(1), M = yc.size(2), N = inverse.size(1);
  auto out = torch::empty({N, M}, yc.options());
  torch::Tensor b, w;
  if (bias.has_value()) b = bias->to(yc.scalar_type()).contiguous();
  if (scales.has_value()) w = scales->to(yc.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(yc.scalar_type(), "reconstruct", [&] {
    reconstruct_impl<scalar_t>(yc.data_ptr<scalar_t>(), inverse.data_ptr<int32_t>(),
                               bias.has_value() ? b.data_ptr<scalar_t>() : nullptr,
                               scales.has_value() ? w.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), nb,
                               cmax, N, M);
  });
  return out;
}

// d_scales[b, n] = dy[n] . yc[b, inverse[b, n]]: (nb, N); each thread owns a range of rows.
template <typename T>
void reconstruct_scales_backward_impl(const T* G, const T* Y, const int32_t* V, T* out, int64_t nb, int64_t cmax,
                                      int64_t N, int64_t M) {
  constexpr int64_t TILE = 64;  // the tile's dy rows stay in cache while every block reads them
  at::parallel_for(0, (N + TILE - 1) / TILE, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t n0 = tile * TILE, n1 = std::min(N, n0 + TILE);
      for (int64_t b = 0; b < nb; ++b) {
        const int32_t* vb = V + b * N;
        const T* yb = Y + b * cmax * M;
        for (int64_t n = n0; n < n1; ++n) {
          const T* g = G + n * M;
          const T* y = yb + vb[n] * M;
          T acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t k = 0; k < M; ++k) acc += g[k] * y[k];
          out[b * N + n] = acc;
        }
      }
    }
  });
}

torch::Tensor reconstruct_scales_backward(torch::Tensor dy_rows, torch::Tensor yc, torch::Tensor inverse) {
  check_cpu_contig(dy_rows, "dy_rows");
  check_cpu_contig(yc, "yc");
  check_cpu_contig(inverse, "inverse");
  const int64_t nb = yc.size(0), cmax = yc.size(1), M = yc.size(2), N = inverse.size(1);
  auto out = torch::empty({nb, N}, yc.options());
  AT_DISPATCH_FLOATING_TYPES(yc.scalar_type(), "reconstruct_scales_backward", [&] {
    reconstruct_scales_backward_impl<scalar_t>(dy_rows.data_ptr<scalar_t>(), yc.data_ptr<scalar_t>(),
                                               inverse.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), nb, cmax, N, M);
  });
  return out;
}

// dy_c,s: dyc[b, s] = sum_{n: inverse[b, n] = s} w[b, n] * dy[n] -> (nb, Cmax, M) (w = 1
// without scales).
template <typename T>
inline void add_row_w(T* __restrict d, const T* __restrict s, const T* W, int64_t i, int64_t len) {
  if (!W) {
    add_row(d, s, len);
    return;
  }
  const T f = W[i];
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) d[k] += f * s[k];
}

// Threads own whole blocks, in groups whose tables fit in L2 (kScatterBudget: the tile of
// gradient rows shares it); the rows go through in tiles, a tile meets every block of the
// group: fn(b, n0, n1) runs in (group, tile, block) order. Row-by-row within one block keeps
// the few hot slot rows in L1. Without the groups a thread cycled through all its tables per
// tile: 1.6-3x slower at L = 8 and L = 25 (tables of 155-570 KB).
constexpr int64_t kScatterBudget = 256 << 10;

constexpr int64_t kScatterTile = 512;  // rows per tile of for_block_tiles

template <typename Fn>
void for_block_tiles(int64_t nb, int64_t N, int64_t table_bytes, Fn fn) {
  constexpr int64_t TILE = kScatterTile;
  const int64_t GB = block_group(nb, table_bytes, kScatterBudget);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t g0 = b0; g0 < b1; g0 += GB) {
      const int64_t g1 = std::min(b1, g0 + GB);
      for (int64_t n0 = 0; n0 < N; n0 += TILE)
        for (int64_t b = g0; b < g1; ++b) fn(b, n0, std::min(N, n0 + TILE));
    }
  });
}

// for_block_tiles, row by row: fn(b, n, slot).
template <typename Fn>
void for_pairs_by_blocks(int64_t nb, int64_t N, int64_t table_bytes, const int32_t* V, Fn fn) {
  for_block_tiles(nb, N, table_bytes, [&](int64_t b, int64_t n0, int64_t n1) {
    const int32_t* vb = V + b * N;
    for (int64_t n = n0; n < n1; ++n) fn(b, n, vb[n]);
  });
}

// One block's rows [n0, n1) into its table, in register strips of NV vectors: while rows
// keep to one slot (runs of the digits' background), their sum stays in registers and meets
// the table once, where adding each row into the table made every add wait for the last one's
// store.
//
// The walk gives the rows' slots and scales in order from row n0: w.slot() and w.weight() (read
// only when Scaled) for the current row, w.next() to the following one; each strip walks a
// copy of w0. ArrayWalk reads (nb, N) tensors; the per-pixel chain walks the pixels
// (PixelWalk, below).
template <typename T, bool Scaled, typename Walk>
void scatter_walk(const T* G, const Walk& w0, T* table, int64_t n0, int64_t n1, int64_t M) {
  using VT = typename Vec<T>::type;
  constexpr int64_t VW = Vec<T>::W, CW = NV * VW;
  int64_t c0 = 0;
  for (; c0 + CW <= M; c0 += CW) {
    VT a[NV] = {};
    Walk w = w0;
    int64_t cur = w.slot();
    for (int64_t n = n0; n < n1; ++n, w.next()) {
      const int64_t s = w.slot();
      if (s != cur) {
        T* d = table + cur * M + c0;
        for (int64_t v = 0; v < NV; ++v) {
          vstore(d + v * VW, vload(d + v * VW) + a[v]);
          a[v] = VT{};
        }
        cur = s;
      }
      const T* g = G + n * M + c0;
      if constexpr (Scaled) {
        const T f = w.weight();
        for (int64_t v = 0; v < NV; ++v) a[v] += f * vload(g + v * VW);
      } else {
        for (int64_t v = 0; v < NV; ++v) a[v] += vload(g + v * VW);
      }
    }
    T* d = table + cur * M + c0;
    for (int64_t v = 0; v < NV; ++v) vstore(d + v * VW, vload(d + v * VW) + a[v]);
  }
  if (c0 < M) {  // the last, narrower strip
    Walk w = w0;
    for (int64_t n = n0; n < n1; ++n, w.next()) {
      const T f = Scaled ? w.weight() : T(1);
      T* d = table + w.slot() * M;
      const T* g = G + n * M;
      for (int64_t k = c0; k < M; ++k) d[k] += f * g[k];
    }
  }
}

template <typename T, bool Scaled>
struct ArrayWalk {
  const int32_t* v;
  const T* w;
  int64_t slot() const { return *v; }
  T weight() const { return *w; }
  void next() {
    ++v;
    if constexpr (Scaled) ++w;
  }
};

template <typename T>
void scatter_runs(const T* G, const int32_t* vb, const T* wb, T* table, int64_t n0, int64_t n1, int64_t M) {
  if (wb)
    scatter_walk<T, true>(G, ArrayWalk<T, true>{vb + n0, wb + n0}, table, n0, n1, M);
  else
    scatter_walk<T, false>(G, ArrayWalk<T, false>{vb + n0, nullptr}, table, n0, n1, M);
}

template <typename T>
void reconstruct_backward_impl(const T* G, const int32_t* V, const T* W, T* out, int64_t nb, int64_t cmax, int64_t N,
                               int64_t M) {
  auto add_into = [&](T* base, int64_t b, int64_t n, int64_t s) {
    add_row_w(base + (b * cmax + s) * M, G + n * M, W, b * N + n, M);
  };
  if (nb >= at::get_num_threads()) {  // each thread owns whole blocks, rows in runs of one slot
    for_block_tiles(nb, N, cmax * M * (int64_t)sizeof(T), [&](int64_t b, int64_t n0, int64_t n1) {
      scatter_runs(G, V + b * N, W ? W + b * N : nullptr, out + b * cmax * M, n0, n1, M);
    });
    return;
  }
  for_pairs_by_rows(nb, N, cmax, M, V, out, add_into);
}

torch::Tensor reconstruct_backward(torch::Tensor dy_rows, torch::Tensor inverse, int64_t cmax,
                                   c10::optional<torch::Tensor> scales) {
  check_cpu_contig(dy_rows, "dy_rows");
  check_cpu_contig(inverse, "inverse");
  const int64_t nb = inverse.size(0), N = inverse.size(1), M = dy_rows.size(1);
  auto out = torch::zeros({nb, cmax, M}, dy_rows.options());
  torch::Tensor w;
  if (scales.has_value()) w = scales->to(dy_rows.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(dy_rows.scalar_type(), "reconstruct_backward", [&] {
    reconstruct_backward_impl<scalar_t>(dy_rows.data_ptr<scalar_t>(), inverse.data_ptr<int32_t>(),
                                        scales.has_value() ? w.data_ptr<scalar_t>() : nullptr,
                                        out.data_ptr<scalar_t>(), nb, cmax, N, M);
  });
  return out;
}

// Both gradients of the scaled reconstruction in one pass over the (block, row) pairs:
// dyc[b, s] = sum_{n in s} w[b, n] dy[n] and d_w[b, n] = dy[n] . yc[b, inverse[b, n]]
// (the same slot row of dyc and yc is touched for each pair). Threads own whole blocks
// (rows in tiles), or with fewer blocks than threads a range of rows.
template <typename T>
void reconstruct_backward_scaled_impl(const T* G, const T* Y, const int32_t* V, const T* W, T* dyc, T* dw,
                                      int64_t nb, int64_t cmax, int64_t N, int64_t M) {
  auto pair_into = [&](T* base, int64_t b, int64_t n, int64_t s) {
    const T* __restrict g = G + n * M;
    const T* __restrict y = Y + (b * cmax + s) * M;
    T* __restrict o = base + (b * cmax + s) * M;
    const T f = W[b * N + n];
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < M; ++k) {
      o[k] += f * g[k];
      acc += g[k] * y[k];
    }
    dw[b * N + n] = acc;
  };
  if (nb >= at::get_num_threads()) {  // each thread owns whole blocks
    for_pairs_by_blocks(nb, N, 2 * cmax * M * (int64_t)sizeof(T), V,
                        [&](int64_t b, int64_t n, int64_t s) { pair_into(dyc, b, n, s); });
    return;
  }
  for_pairs_by_rows(nb, N, cmax, M, V, dyc, pair_into);
}

std::vector<torch::Tensor> reconstruct_backward_scaled(torch::Tensor dy_rows, torch::Tensor yc,
                                                       torch::Tensor inverse, torch::Tensor scales) {
  check_cpu_contig(dy_rows, "dy_rows");
  check_cpu_contig(yc, "yc");
  check_cpu_contig(inverse, "inverse");
  check_cpu_contig(scales, "scales");
  const int64_t nb = yc.size(0), cmax = yc.size(1), M = yc.size(2), N = inverse.size(1);
  TORCH_CHECK(dy_rows.scalar_type() == yc.scalar_type() && scales.scalar_type() == yc.scalar_type(),
              "reconstruct_backward_scaled: dy, yc and scales must share a dtype");
  auto dyc = torch::zeros({nb, cmax, M}, yc.options());
  auto dw = torch::empty({nb, N}, yc.options());
  AT_DISPATCH_FLOATING_TYPES(yc.scalar_type(), "reconstruct_backward_scaled", [&] {
    reconstruct_backward_scaled_impl<scalar_t>(dy_rows.data_ptr<scalar_t>(), yc.data_ptr<scalar_t>(),
                                               inverse.data_ptr<int32_t>(), scales.data_ptr<scalar_t>(),
                                               dyc.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(), nb, cmax, N, M);
  });
  return {dyc, dw};
}

// Units: runs of U channels, U the largest divisor of C that divides every piece's first
// channel and length, so that every piece covers whole units (U = L for chunk blocks, C for
// windows and kernel-row runs, 1 in the worst case). A block's norm is then a sum of the
// units' sums of squares, and its backward adds one factor per unit.
int64_t unit_len(const Geo& g, const std::vector<Piece>& pieces) {
  int64_t u = g.C;
  for (const auto& q : pieces) u = std::gcd(u, std::gcd(q.c0, q.len));
  return std::max<int64_t>(u, 1);
}

// Per unit of U entries, its sum of squares (or, with root, its norm): one pass over X.
template <typename T>
void unit_squares(const T* X, T* sq, int64_t units, int64_t U, bool root) {
  at::parallel_for(0, units, 1024, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const T* src = X + i * U;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < U; ++k) acc += src[k] * src[k];
      sq[i] = root ? std::sqrt(acc) : acc;
    }
  });
}

// ||x_{n,b}|| of every member sub-vector: (nb, N). The units' sums of squares once (P*C),
// then per (block, row) a sum over its units (N*K/U). Threads own ranges of output rows.
template <typename T>
void member_norms_impl(const T* X, T* O, const Geo& g, const std::vector<Piece>& pieces,
                       const std::vector<int64_t>& start, int64_t nb) {
  const int64_t U = unit_len(g, pieces), upp = g.C / U, N = g.N();
  // every block one unit (chunk blocks): its norm is the unit's, taken once per unit and copied
  bool single = (int64_t)pieces.size() == nb;
  for (const auto& q : pieces) single = single && q.len == U;
  std::vector<T> sq(g.P() * upp);
  unit_squares(X, sq.data(), g.P() * upp, U, single);
  std::vector<int64_t> off(pieces.size()), len(pieces.size());  // per piece, in units
  for (size_t p = 0; p < pieces.size(); ++p) {
    off[p] = g.tap_offset(pieces[p].t) * upp + pieces[p].c0 / U;
    len[p] = pieces[p].len / U;
  }
  const int64_t rows = g.Nb * g.Oh;  // output rows (image, oh) of every block
  at::parallel_for(0, nb * rows, 16, [&](int64_t i0, int64_t i1) {
    std::vector<T> acc(g.Ow);  // the row's outputs side by side: independent sums
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / rows, r = i % rows, bb = r / g.Oh, oh = r % g.Oh;
      const T* s0 = sq.data() + (bb * g.Hp + oh * g.sh) * g.Wp * upp;
      T* __restrict dst = O + b * N + r * g.Ow;
      T* __restrict ac = acc.data();
      const int64_t p0 = start[b], p1 = start[b + 1], step = g.sw * upp, Ow = g.Ow;
      if (single) {
        const T* __restrict s = s0 + off[p0];
        for (int64_t ow = 0; ow < Ow; ++ow) dst[ow] = s[ow * step];
        continue;
      }
      std::fill(ac, ac + Ow, T(0));
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t u = 0; u < len[p]; ++u) {
          const T* __restrict s = s0 + off[p] + u;
          if (step == 1) {
#pragma omp simd
            for (int64_t ow = 0; ow < Ow; ++ow) ac[ow] += s[ow];
          } else {
            for (int64_t ow = 0; ow < Ow; ++ow) ac[ow] += s[ow * step];
          }
        }
      for (int64_t ow = 0; ow < Ow; ++ow) dst[ow] = std::sqrt(ac[ow]);
    }
  });
}

torch::Tensor member_norms(torch::Tensor xp, std::vector<int64_t> geo, torch::Tensor pieces_t, int64_t nb) {
  check_cpu_contig(xp, "xp");
  const Geo g = make_geo(geo);
  const auto pieces = read_pieces(pieces_t);
  std::vector<int64_t> start(nb + 1, 0);
  for (const auto& q : pieces) start[q.b + 1]++;
  for (int64_t b = 0; b < nb; ++b) start[b + 1] += start[b];
  auto out = torch::empty({nb, g.N()}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "member_norms", [&] {
    member_norms_impl<scalar_t>(xp.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), g, pieces, start, nb);
  });
  return out;
}

// Backward of member_norms: d xp[p, c] = xp[p, c] * sum over the members (b, n) whose
// sub-vector covers (p, c) of g[b, n] / norm[b, n] (0 where the norm is 0). Each thread
// owns a range of padded pixel rows; the factors are summed per unit, then broadcast.
//
// With `in` (pt, pl, H, W) the input is the unpadded x (Nb, H, W, C) sitting at rows
// [pt, pt + H) and columns [pl, pl + W) of the padded frame, and only its gradient is written
// (Nb, H, W, C): no padded gradient is formed.


// d = v, or d += v when accumulating into another gradient of the same input already in D
template <bool Add, typename T>
inline void put(T& d, T v) {
  if constexpr (Add) {
    d += v;
  } else {
    d = v;
  }
}

template <typename T, bool Add>
void member_norms_backward_impl(const T* Gs, const T* S, const T* X, T* D, const Geo& g,
                                const std::vector<Piece>& pieces, const TapIndex& ix, Interior in) {
  const int64_t N = g.N(), C = g.C, U = unit_len(g, pieces), upp = C / U;
  const bool padded = in.H < 0;
  at::parallel_for(0, g.Nb * g.Hp, 1, [&](int64_t r0, int64_t r1) {
    std::vector<T> acc(g.Wp * upp);
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t hp = row % g.Hp, bb = row / g.Hp;
      if (!padded && (hp < in.pt || hp >= in.pt + in.H)) continue;  // a padding row
      std::fill(acc.begin(), acc.end(), T(0));
      visit_row(g, row, pieces, ix, [&](const Piece& q, int64_t j, int64_t nrow) {
        // locals: the stores into acc could alias the piece, so its fields would be
        // reloaded every iteration
        const T* __restrict sv = S + q.b * N + nrow;
        const T* __restrict gv = Gs + q.b * N + nrow;
        T* __restrict a = acc.data() + j * g.dw * upp + q.c0 / U;
        const int64_t step = g.sw * upp, Ow = g.Ow, nu = q.len / U;
        for (int64_t ow = 0; ow < Ow; ++ow) {
          const T s = sv[ow];
          if (s == T(0)) continue;
          const T f = gv[ow] / s;
          T* d = a + ow * step;
          for (int64_t u = 0; u < nu; ++u) d[u] += f;
        }
      });
      if (padded) {
        const T* xrow = X + row * g.Wp * C;
        T* drow = D + row * g.Wp * C;
        for (int64_t e = 0; e < g.Wp * upp; ++e) {
          const T f = acc[e];
#pragma omp simd
          for (int64_t k = 0; k < U; ++k) put<Add>(drow[e * U + k], f * xrow[e * U + k]);
        }
      } else {  // the real pixels of this row only
        T* drow = D + (bb * in.H + hp - in.pt) * in.W * C;
        const T* xrow = X + bb * in.s0 + (hp - in.pt) * in.s1;
        const T* a = acc.data() + in.pl * upp;
        if (in.s3 == 1 && in.s2 == C) {  // channels-last rows: contiguous
          for (int64_t e = 0; e < in.W * upp; ++e) {
            const T f = a[e];
#pragma omp simd
            for (int64_t k = 0; k < U; ++k) put<Add>(drow[e * U + k], f * xrow[e * U + k]);
          }
        } else {  // e.g. NCHW: strided reads, no channels-last copy of x
          for (int64_t c = 0; c < C; ++c) {
            const T* xc = xrow + c * in.s3;
            const T* ac = a + c / U;
            for (int64_t w = 0; w < in.W; ++w) put<Add>(drow[w * C + c], ac[w * upp] * xc[w * in.s2]);
          }
        }
      }
    }
  });
}

// With pt < 0, x is the padded xp (Nb, Hp, Wp, C), contiguous, and so is the gradient. With
// pt, pl >= 0, x is the unpadded input (Nb, H, W, C) in any layout (read with its strides) at
// (pt, pl) of the padded frame, and its gradient is (Nb, C, H, W) channels-last.
// With `out` given, the gradient is added into it (it must have the result's shape, dtype and
// layout): the norm-preserving centroid's two input gradients share one buffer.
torch::Tensor member_norms_backward(torch::Tensor g_norms, torch::Tensor norms, torch::Tensor x,
                                    std::vector<int64_t> geo, torch::Tensor pieces_t, int64_t pt, int64_t pl,
                                    c10::optional<torch::Tensor> out) {
  check_cpu_contig(g_norms, "g_norms");
  check_cpu_contig(norms, "norms");
  const Geo g = make_geo(geo);
  const auto pieces = read_pieces(pieces_t);
  const TapIndex ix = index_by_tap(pieces, g.kh * g.kw);
  const bool add = out.has_value() && out->defined();
  torch::Tensor D;
  Interior in;
  if (pt < 0) {
    check_cpu_contig(x, "xp");
    D = add ? *out : torch::empty_like(x);
    if (add) check_cpu_contig(D, "out");
    TORCH_CHECK(D.sizes() == x.sizes() && D.scalar_type() == x.scalar_type(),
                "member_norms_backward: out must be shaped and typed like xp");
  } else {
    TORCH_CHECK(x.device().is_cpu(), "reuse kernels: x must be a CPU tensor");
    TORCH_CHECK(x.dim() == 4 && x.size(0) == g.Nb && x.size(3) == g.C && pl >= 0 && pt + x.size(1) <= g.Hp &&
                    pl + x.size(2) <= g.Wp,
                "member_norms_backward: x must be (Nb, H, W, C) inside the padded frame");
    // (Nb, C, H, W) channels-last: (Nb, H, W, C) in memory, and autograd can add into it in place
    if (add) {
      D = *out;
      TORCH_CHECK(D.device().is_cpu() && D.scalar_type() == x.scalar_type() && D.dim() == 4 &&
                      D.size(0) == x.size(0) && D.size(1) == x.size(3) && D.size(2) == x.size(1) &&
                      D.size(3) == x.size(2) && D.is_contiguous(at::MemoryFormat::ChannelsLast),
                  "member_norms_backward: out must be x's gradient, (Nb, C, H, W) channels-last");
    } else {
      D = torch::empty({x.size(0), x.size(3), x.size(1), x.size(2)},
                       x.options().memory_format(at::MemoryFormat::ChannelsLast));
    }
    in = Interior{pt, pl, x.size(1), x.size(2), x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "member_norms_backward", [&] {
    auto impl = add ? member_norms_backward_impl<scalar_t, true> : member_norms_backward_impl<scalar_t, false>;
    impl(g_norms.data_ptr<scalar_t>(), norms.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), D.data_ptr<scalar_t>(), g,
         pieces, ix, in);
  });
  return D;
}

// ids[b, n] = unit[(a(n) + off(tap_b)) * per_pixel + q_b] for blocks given as (tap, q) pairs.
torch::Tensor gather_ids(torch::Tensor unit, int64_t per_pixel, torch::Tensor blocks, std::vector<int64_t> geo) {
  check_cpu_contig(unit, "unit");
  const Geo g = make_geo(geo);
  auto bl = blocks.contiguous();
  const int64_t nb = bl.size(0), N = g.N(), rows = g.Nb * g.Oh;
  auto ids = torch::empty({nb, N}, unit.options());
  const int64_t* U = unit.data_ptr<int64_t>();
  const int64_t* B = bl.data_ptr<int64_t>();
  int64_t* out = ids.data_ptr<int64_t>();
  at::parallel_for(0, nb * rows, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / rows, r = i % rows, bb = r / g.Oh, oh = r % g.Oh;
      const int64_t* src = U + ((bb * g.Hp + oh * g.sh) * g.Wp + g.tap_offset(B[2 * b])) * per_pixel + B[2 * b + 1];
      int64_t* dst = out + b * N + r * g.Ow;
      const int64_t step = g.sw * per_pixel;
      for (int64_t ow = 0; ow < g.Ow; ++ow) dst[ow] = src[ow * step];
    }
  });
  return ids;
}

// ids[o, i] = sum_k (proj[o, k, i] > 0) << k for proj viewed as (outer, H, inner), inner
// stride 1 (or inner = 1): the sign bits of the projections, packed (H <= 63).
template <typename T>
void pack_signs_impl(const T* P, int64_t* out, int64_t outer, int64_t H, int64_t inner, int64_t so, int64_t sk) {
  at::parallel_for(0, outer, std::max<int64_t>(1, 4096 / inner), [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      int64_t* d = out + o * inner;
      const T* p = P + o * so;
      if (inner == 1) {
        int64_t id = 0;
        for (int64_t k = 0; k < H; ++k) id |= int64_t(p[k * sk] > 0) << k;
        d[0] = id;
        continue;
      }
      std::memset(d, 0, sizeof(int64_t) * inner);
      for (int64_t k = 0; k < H; ++k) {
        const T* pk = p + k * sk;
#pragma omp simd
        for (int64_t i = 0; i < inner; ++i) d[i] |= int64_t(pk[i] > 0) << k;
      }
    }
  });
}

torch::Tensor pack_signs(torch::Tensor proj) {
  TORCH_CHECK(proj.device().is_cpu() && proj.dim() == 3, "pack_signs: a CPU (outer, H, inner) tensor");
  const int64_t outer = proj.size(0), H = proj.size(1), inner = proj.size(2);
  TORCH_CHECK(H <= 63, "pack_signs: at most 63 bits");
  TORCH_CHECK(inner == 1 || proj.stride(2) == 1, "pack_signs: the inner dimension must be contiguous");
  auto ids = torch::empty({outer, inner}, proj.options().dtype(torch::kInt64));
  AT_DISPATCH_FLOATING_TYPES(proj.scalar_type(), "pack_signs", [&] {
    pack_signs_impl<scalar_t>(proj.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), outer, H, inner, proj.stride(0),
                              proj.stride(1));
  });
  return ids;
}

// ids[u] = sum_k (planes[:, k] . X[u] > 0) << k for the U rows of X (U, L): Eq. 4 without
// forming the (U, H) projections. Tiles of TP rows share each plane row's load; the planes are
// read in columns of HB (zero-padded), so the TP x HB accumulators are independent chains.
// HB is one 512-bit vector, or half of one when H fits it (H <= 8 in float32: half the work).
template <typename T, int64_t HB>
void hash_rows_impl(const T* X, const T* Pl, int64_t* out, int64_t U, int64_t L, int64_t H) {
  constexpr int64_t TP = 8;
  const int64_t nhb = (H + HB - 1) / HB;
  std::vector<T> pp(nhb * L * HB, T(0));  // (column block, l, HB)
  for (int64_t l = 0; l < L; ++l)
    for (int64_t k = 0; k < H; ++k) pp[((k / HB) * L + l) * HB + k % HB] = Pl[l * H + k];
  at::parallel_for(0, (U + TP - 1) / TP, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t u0 = t * TP, nt = std::min(TP, U - u0);
      const T* rows[TP];
      for (int64_t i = 0; i < TP; ++i) rows[i] = X + (u0 + (i < nt ? i : 0)) * L;
      int64_t ids[TP] = {0};
      for (int64_t hb = 0; hb < nhb; ++hb) {
        T acc[TP][HB] = {};
        const T* pb = pp.data() + hb * L * HB;
        for (int64_t l = 0; l < L; ++l) {
          const T* __restrict pl = pb + l * HB;
          for (int64_t i = 0; i < TP; ++i) {
            const T v = rows[i][l];
#pragma omp simd
            for (int64_t k = 0; k < HB; ++k) acc[i][k] += v * pl[k];
          }
        }
        const int64_t kn = std::min(HB, H - hb * HB);
        for (int64_t i = 0; i < TP; ++i)
          for (int64_t k = 0; k < kn; ++k) ids[i] |= int64_t(acc[i][k] > 0) << (hb * HB + k);
      }
      for (int64_t i = 0; i < nt; ++i) out[u0 + i] = ids[i];
    }
  });
}

torch::Tensor hash_rows(torch::Tensor rows, torch::Tensor planes) {
  check_cpu_contig(rows, "rows");
  check_cpu_contig(planes, "planes");
  TORCH_CHECK(rows.dim() == 2 && planes.dim() == 2 && rows.size(1) == planes.size(0),
              "hash_rows: rows (U, L) and planes (L, H)");
  TORCH_CHECK(rows.scalar_type() == planes.scalar_type(), "hash_rows: rows and planes must share a dtype");
  const int64_t U = rows.size(0), L = rows.size(1), H = planes.size(1);
  TORCH_CHECK(H <= 63, "hash_rows: at most 63 bits");
  auto ids = torch::empty({U}, rows.options().dtype(torch::kInt64));
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "hash_rows", [&] {
    constexpr int64_t W = 64 / sizeof(scalar_t);
    auto impl = H <= W / 2 ? hash_rows_impl<scalar_t, W / 2> : hash_rows_impl<scalar_t, W>;
    impl(rows.data_ptr<scalar_t>(), planes.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), U, L, H);
  });
  return ids;
}

// im2col's padded channels-last copy of x in one pass: x (Nb, H, W, C) contiguous (a
// channels-last tensor, permuted) -> (Nb, H + t + b, W + l + r, C), zero around x. Threads own
// padded rows; each is written once (PyTorch's zero fills of the four borders and the strided
// copy took ~1.2 ms per step on conv2's input).
torch::Tensor pad_nhwc(torch::Tensor x, int64_t t, int64_t b, int64_t l, int64_t r) {
  check_cpu_contig(x, "x");
  TORCH_CHECK(x.dim() == 4 && t >= 0 && b >= 0 && l >= 0 && r >= 0, "pad_nhwc: x must be (Nb, H, W, C), pads >= 0");
  const int64_t Nb = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3), Hp = H + t + b, Wp = W + l + r;
  auto out = torch::empty({Nb, Hp, Wp, C}, x.options());
  const int64_t es = x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, Nb * Hp, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t bb = row / Hp, hp = row % Hp;
      char* d = dst + row * Wp * C * es;
      if (hp < t || hp >= t + H) {
        std::memset(d, 0, Wp * C * es);
        continue;
      }
      std::memset(d, 0, l * C * es);
      std::memcpy(d + l * C * es, src + (bb * H + hp - t) * W * C * es, W * C * es);
      std::memset(d + (l + W) * C * es, 0, r * C * es);
    }
  });
  return out;
}

// The norm centroid's unit rows, u = c / max(||c||, eps) along the last dimension, and their
// backward, (g - u (u . g)) / max(||c||, eps) (no projection term where ||c|| < eps), as
// F.normalize computes them; one pass each over (R, E) rows, threads own row ranges.
template <typename T>
void unit_rows_impl(const T* C, T* U, int64_t R, int64_t E, double eps) {
  at::parallel_for(0, R, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict c = C + r * E;
      T* __restrict u = U + r * E;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < E; ++k) acc += c[k] * c[k];
      T d = std::max(std::sqrt(acc), T(eps));
      if (std::isinf(acc)) {  // float squares overflow above ~1e19: the length again in double
        double wide = 0;
        for (int64_t k = 0; k < E; ++k) wide += double(c[k]) * double(c[k]);
        d = T(std::max(std::sqrt(wide), eps));
      }
#pragma omp simd
      for (int64_t k = 0; k < E; ++k) u[k] = c[k] / d;
    }
  });
}

torch::Tensor unit_rows(torch::Tensor c, double eps) {
  check_cpu_contig(c, "c");
  TORCH_CHECK(c.dim() >= 1, "unit_rows: c needs a last dimension");
  const int64_t E = c.size(-1), R = E ? c.numel() / E : 0;
  auto u = torch::empty_like(c);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "unit_rows", [&] {
    unit_rows_impl<scalar_t>(c.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), R, E, eps);
  });
  return u;
}

template <typename T>
void unit_rows_backward_impl(const T* U, const T* Nrm, const T* G, T* D, int64_t R, int64_t E, double eps) {
  at::parallel_for(0, R, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict u = U + r * E;
      const T* __restrict g = G + r * E;
      T* __restrict d = D + r * E;
      const T n = Nrm[r];
      T dot = 0;
      if (n >= T(eps)) {
#pragma omp simd reduction(+ : dot)
        for (int64_t k = 0; k < E; ++k) dot += u[k] * g[k];
      }
      const T den = std::max(n, T(eps));
#pragma omp simd
      for (int64_t k = 0; k < E; ++k) d[k] = (g[k] - u[k] * dot) / den;
    }
  });
}

torch::Tensor unit_rows_backward(torch::Tensor u, torch::Tensor n, torch::Tensor g, double eps) {
  check_cpu_contig(u, "u");
  check_cpu_contig(n, "n");
  check_cpu_contig(g, "g");
  TORCH_CHECK(u.sizes() == g.sizes() && u.scalar_type() == g.scalar_type() && n.scalar_type() == u.scalar_type(),
              "unit_rows_backward: u and g must match, n share their dtype");
  const int64_t E = u.size(-1), R = E ? u.numel() / E : 0;
  TORCH_CHECK(n.numel() == R, "unit_rows_backward: one norm per row");
  auto d = torch::empty_like(u);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "unit_rows_backward", [&] {
    unit_rows_backward_impl<scalar_t>(u.data_ptr<scalar_t>(), n.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                                      d.data_ptr<scalar_t>(), R, E, eps);
  });
  return d;
}

// ---------------------------------------------------------------------------------------
// The per-pixel chain (chunk blocks with L = C, stride 1, "batch" scope; ops.py): block b is
// tap b, every block hashes a pixel to the same id, so the chain keeps per pixel what the
// generic chain keeps per (block, row): the ids (Nb, Hp, Wp), each pixel's key rank `ranks`
// (the rank of its id among the ids of the pixels any block covers, ascending; -1 for a pixel
// no block covers), a per-block map slot_map (nb, G) from key rank to slot (-1 where the block
// has no such pixel), and the member norms. Row n's slot in block b is then
// slot_map[b, ranks[a(n) + off(b)]], the generic chain's inverse[b, n], and every kernel
// below sums what its generic twin sums, in the same order: the results are the same bits.

namespace {

Geo pixel_geo(const std::vector<int64_t>& geo, const char* what) {
  const Geo g = make_geo(geo);
  TORCH_CHECK(g.sh == 1 && g.sw == 1 && g.L == g.C && g.L > 0, what,
              ": the per-pixel chain needs stride 1 and sub-vectors of one pixel (L = C)");
  return g;
}

void check_pixel_maps(const Geo& g, const torch::Tensor& ranks, const torch::Tensor& slot_map, const char* what) {
  check_cpu_contig(ranks, "ranks");
  check_cpu_contig(slot_map, "slot_map");
  TORCH_CHECK(ranks.scalar_type() == torch::kInt32 && slot_map.scalar_type() == torch::kInt32, what,
              ": ranks and slot_map must be int32");
  TORCH_CHECK(ranks.numel() == g.P() && slot_map.dim() == 2 && slot_map.size(0) == g.kh * g.kw, what,
              ": ranks must be (Nb, Hp, Wp) and slot_map (taps, G)");
}

// The chunk plan of the per-pixel chain: the generic plan's geometry and cost rule, its
// global ranks read off slot_map (the same ranks: both rank the ids the blocks hold), and
// U = ranks inside the planned intervals.
bool pixel_plan(ChunkPlan& cp, const Geo& g, const std::vector<Piece>& pieces, const int32_t* R, const int32_t* SM,
                int64_t G, int64_t cmax, int64_t mode, const Interior& in) {
  const int64_t nb = g.kh * g.kw;
  if (!chunk_geometry(cp, g, pieces, nb, mode, in)) return false;
  cp.G = G;
  cp.gmap.assign(nb * cmax, -1);
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t r = 0; r < G; ++r)
      if (SM[b * G + r] >= 0) cp.gmap[b * cmax + SM[b * G + r]] = r;
  if (!chunk_affordable(cp, g, mode)) return false;
  cp.U.assign(g.P(), -1);
  at::parallel_for(0, g.Nb * g.Hp, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t ri = cp.rint[row % g.Hp];
      if (ri < 0 || cp.ihi[ri] <= cp.ilo[ri]) continue;
      for (int64_t wp = 0; wp < g.Wp; ++wp) {
        const int64_t ci = cp.cint[wp];
        if (ci < 0 || cp.jhi[ci] <= cp.jlo[ci]) continue;
        cp.U[row * g.Wp + wp] = R[row * g.Wp + wp];
      }
    }
  });
  return true;
}

// v[i] = sm[r[i]] for i < len: a run of slots looked up through consecutive pixels (restrict:
// vectorised, one gather per 16 lanes).
inline void gather_run(int32_t* __restrict v, const int32_t* __restrict sm, const int32_t* __restrict r,
                       int64_t len) {
  for (int64_t i = 0; i < len; ++i) v[i] = sm[r[i]];
}

// Anchors a(n) of consecutive rows without divisions: start at row n, then advance().
struct RowWalk {
  const Geo& g;
  int64_t img, oh, ow;
  RowWalk(const Geo& g_, int64_t n) : g(g_) {
    ow = n % g.Ow;
    const int64_t r = n / g.Ow;
    oh = r % g.Oh;
    img = r / g.Oh;
  }
  int64_t anchor() const { return (img * g.Hp + oh) * g.Wp + ow; }  // stride 1
  int64_t left() const { return g.Ow - ow; }                        // rows to the end of this output row
  void advance(int64_t len) {  // len <= left()
    if ((ow += len) == g.Ow) {
      ow = 0;
      if (++oh == g.Oh) {
        oh = 0;
        ++img;
      }
    }
  }
};

// fn(i, p, len) for the rows [n0, n0 + nt) of the tile in runs along one output row: rows
// i .. i + len of the tile read pixels p .. p + len (plus the tap's offset).
template <typename Fn>
inline void for_row_runs(const Geo& g, int64_t n0, int64_t nt, Fn fn) {
  RowWalk rw(g, n0);
  for (int64_t i = 0; i < nt;) {
    const int64_t len = std::min(nt - i, rw.left());
    fn(i, rw.anchor(), len);
    rw.advance(len);
    i += len;
  }
}

std::vector<int64_t> tap_offsets(const Geo& g) {
  std::vector<int64_t> off(g.kh * g.kw);
  for (int64_t t = 0; t < g.kh * g.kw; ++t) off[t] = g.tap_offset(t);
  return off;
}

// The covered positions of one axis: tap i covers [i*d, i*d + O).
std::vector<char> covered_axis(int64_t Pn, int64_t k, int64_t d, int64_t O) {
  std::vector<char> c(Pn, 0);
  for (int64_t i = 0; i < k; ++i)
    for (int64_t v = i * d; v < std::min(Pn, i * d + O); ++v) c[v] = 1;
  return c;
}

// ----------------------------------------------------------------------------- zero-skip
// The weight and bias gradients of an exact convolution (groups 1) that skip the inputs equal
// to their channel's common value s[c] (zero after a ReLU; a digit's normalised blank pixel).
// With x' = x - s (zero where x == s), for tap (i, j) and the output positions o whose input
// at that tap lies inside the image (the zero padding outside contributes nothing):
//   dW[m, c, i, j] = sum over non-zero x'[b, c, y, x] of x' * dy[b, m, o]  +  s[c] * R_ij[m],
//   R_ij[m] = sum of S[o, m] over those o,   S[o, m] = sum_b dy[b, m, o],   db[m] = sum_o S[o, m].
// The same sums as F.conv2d's weight gradient, regrouped (each thread adds its images in turn,
// the threads' sums are added in thread order): on an input that is mostly its common value
// (a first layer on digits: ~75% of the pixels) most products are not formed.
// x: (Nb, C, H, W), any strides; gy: (Nb, Oh, Ow, M) contiguous (the channels-last memory of
// dy); skip: (C,) of x's dtype; p: kh, kw, sh, sw, pt, pl, dh, dw. Returns (dW (M, C, kh, kw), db (M)).
// Stride 1, a kernel row i of KW taps and 64 output channels at a time in registers: every
// listed input (y, x, v) adds v * dy[o] to tap j's accumulator, o = (y + pt - i*dh, x + pl - j*dw).
template <typename T, int KW>
void zero_skip_row(const T* __restrict Gb, const int32_t* ys, const int32_t* xs, const T* vs, int64_t n, int64_t i,
                   int64_t pt, int64_t pl, int64_t dh, int64_t dw, int64_t Oh, int64_t Ow, int64_t M, int64_t m0,
                   T* __restrict drow) {
  constexpr int MB = 64;
  T acc[KW][MB];
  for (int j = 0; j < KW; ++j)
#pragma omp simd
    for (int q = 0; q < MB; ++q) acc[j][q] = T(0);
  for (int64_t e = 0; e < n; ++e) {
    const int64_t oy = ys[e] + pt - i * dh;
    if (oy < 0 || oy >= Oh) continue;
    const int64_t ox0 = xs[e] + pl;  // tap j's output column: ox0 - j * dw
    const T v = vs[e];
    const T* grow = Gb + oy * Ow * M + m0;
    if (ox0 - (KW - 1) * dw >= 0 && ox0 < Ow) {  // every tap of the row inside
#pragma GCC unroll 8
      for (int j = 0; j < KW; ++j) {
        const T* g = grow + (ox0 - j * dw) * M;
#pragma omp simd
        for (int q = 0; q < MB; ++q) acc[j][q] += v * g[q];
      }
    } else {
      for (int j = 0; j < KW; ++j) {
        const int64_t ox = ox0 - j * dw;
        if (ox < 0 || ox >= Ow) continue;
        const T* g = grow + ox * M;
#pragma omp simd
        for (int q = 0; q < MB; ++q) acc[j][q] += v * g[q];
      }
    }
  }
  for (int j = 0; j < KW; ++j)
#pragma omp simd
    for (int q = 0; q < MB; ++q) drow[j * M + m0 + q] += acc[j][q];
}

template <typename T>
using ZeroSkipRow = void (*)(const T*, const int32_t*, const int32_t*, const T*, int64_t, int64_t, int64_t, int64_t,
                             int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, T*);

template <typename T>
ZeroSkipRow<T> zero_skip_row_for(int64_t kw) {
  switch (kw) {
    case 1: return zero_skip_row<T, 1>;
    case 2: return zero_skip_row<T, 2>;
    case 3: return zero_skip_row<T, 3>;
    case 4: return zero_skip_row<T, 4>;
    case 5: return zero_skip_row<T, 5>;
    case 6: return zero_skip_row<T, 6>;
    case 7: return zero_skip_row<T, 7>;
    default: return nullptr;
  }
}

// grad_of(b, buf): image b's output gradient (Oh, Ow, M) contiguous: a pointer into gy, or
// buf (a thread's Oh * Ow * M scratch, allocated when `scratch`) filled by the caller.
template <typename T, typename GradOf>
void zero_skip_impl(const T* __restrict X, GradOf grad_of, bool scratch, const T* Sk, T* P, int64_t Nb, int64_t C,
                    int64_t H, int64_t W, int64_t Oh, int64_t Ow, int64_t M, const int64_t* st,
                    const std::vector<int64_t>& p, int64_t nt, bool shifted) {
  const int64_t kh = p[0], kw = p[1], sh = p[2], sw = p[3], pt = p[4], pl = p[5], dh = p[6], dw = p[7];
  const int64_t s0 = st[0], s1 = st[1], s2 = st[2], s3 = st[3];
  const std::vector<T> skip(Sk, Sk + C);
  const int64_t K = C * kh * kw, O = Oh * Ow;
  const int64_t part = (K + 1 + (shifted ? O : 0)) * M;  // dW (K, M), db (M), S (O, M) if shifted
  // stride 1 and a kernel row of at most 7 taps: the register-blocked rows for the 64-channel
  // blocks of M; the channels past them (and any other shape) one (input, tap) at a time
  const ZeroSkipRow<T> row = sh == 1 && sw == 1 ? zero_skip_row_for<T>(kw) : nullptr;
  const int64_t mblocked = row ? M / 64 * 64 : 0;
  at::parallel_for(0, nt, 1, [&](int64_t th0, int64_t th1) {
    std::vector<int32_t> ys(H * W), xs(H * W);
    std::vector<T> vs(H * W);
    std::vector<T> buf(scratch ? O * M : 0);
    for (int64_t th = th0; th < th1; ++th) {
      T* dW = P + th * part;
      T* db = dW + K * M;
      T* S = db + M;
      for (int64_t b = Nb * th / nt; b < Nb * (th + 1) / nt; ++b) {
        const T* Gb = grad_of(b, buf.data());
        if (shifted) {
          for (int64_t r = 0; r < O; ++r) {
            const T* g = Gb + r * M;
            T* sr = S + r * M;
#pragma omp simd
            for (int64_t m = 0; m < M; ++m) sr[m] += g[m];
          }
        } else {
          for (int64_t r = 0; r < O; ++r) {
            const T* g = Gb + r * M;
#pragma omp simd
            for (int64_t m = 0; m < M; ++m) db[m] += g[m];
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          int64_t n = 0;  // the channel's inputs other than its common value, as x - s
          for (int64_t iy = 0; iy < H; ++iy)
            for (int64_t ix = 0; ix < W; ++ix) {
              const T xv = X[b * s0 + c * s1 + iy * s2 + ix * s3];
              ys[n] = (int32_t)iy;
              xs[n] = (int32_t)ix;
              vs[n] = xv - skip[c];
              n += xv != skip[c];
            }
          for (int64_t i = 0; i < kh; ++i) {
            T* drow = dW + (c * kh + i) * kw * M;
            for (int64_t m0 = 0; m0 < mblocked; m0 += 64)
              row(Gb, ys.data(), xs.data(), vs.data(), n, i, pt, pl, dh, dw, Oh, Ow, M, m0, drow);
            if (mblocked == M) continue;
            for (int64_t e = 0; e < n; ++e) {
              int64_t oy = ys[e] + pt - i * dh;  // = oy * sh
              if (oy < 0 || oy % sh) continue;
              oy /= sh;
              if (oy >= Oh) continue;
              for (int64_t j = 0; j < kw; ++j) {
                int64_t ox = xs[e] + pl - j * dw;
                if (ox < 0 || ox % sw) continue;
                ox /= sw;
                if (ox >= Ow) continue;
                const T* __restrict g = Gb + (oy * Ow + ox) * M;
                T* __restrict d = drow + j * M;
                const T v = vs[e];
#pragma omp simd
                for (int64_t m = mblocked; m < M; ++m) d[m] += v * g[m];
              }
            }
          }
        }
      }
    }
  });
}

// With a shifted input: the threads' S summed (in thread order), db from it, and each tap's
// s[c] * R_ij added to dW (the sum over the tap's in-image output positions).
template <typename T>
void zero_skip_finish(T* sum, const T* Sk, int64_t C, int64_t H, int64_t W, int64_t Oh, int64_t Ow, int64_t M,
                      const std::vector<int64_t>& p) {
  const int64_t kh = p[0], kw = p[1], sh = p[2], sw = p[3], pt = p[4], pl = p[5], dh = p[6], dw = p[7];
  const int64_t K = C * kh * kw;
  T* dW = sum;
  T* db = sum + K * M;
  const T* S = db + M;
  for (int64_t r = 0; r < Oh * Ow; ++r)
    for (int64_t m = 0; m < M; ++m) db[m] += S[r * M + m];
  std::vector<T> R(M);
  for (int64_t i = 0; i < kh; ++i)
    for (int64_t j = 0; j < kw; ++j) {
      std::fill(R.begin(), R.end(), T(0));
      for (int64_t oy = 0; oy < Oh; ++oy) {
        const int64_t iy = oy * sh - pt + i * dh;
        if (iy < 0 || iy >= H) continue;
        for (int64_t ox = 0; ox < Ow; ++ox) {
          const int64_t ix = ox * sw - pl + j * dw;
          if (ix < 0 || ix >= W) continue;
          for (int64_t m = 0; m < M; ++m) R[m] += S[(oy * Ow + ox) * M + m];
        }
      }
      for (int64_t c = 0; c < C; ++c)
        for (int64_t m = 0; m < M; ++m) dW[((c * kh + i) * kw + j) * M + m] += Sk[c] * R[m];
    }
}

// The weight and bias gradients both ops share: zero_skip_impl's per-thread sums, added in
// thread order, plus the common values' terms (zero_skip_finish); (dW (M, C, kh, kw), db (M)).
// make_grad_of(T{}) gives the per-image gradient callable for x's dtype T; scratch as in
// zero_skip_impl; p: kh, kw, sh, sw, pt, pl, dh, dw.
template <typename MakeGradOf>
std::vector<torch::Tensor> zero_skip_sums(const torch::Tensor& x, const torch::Tensor& skip, int64_t Oh, int64_t Ow,
                                          int64_t M, const std::vector<int64_t>& p, bool scratch,
                                          MakeGradOf make_grad_of) {
  const int64_t Nb = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = C * p[0] * p[1];
  auto sk = skip.contiguous();
  const bool shifted = bool(sk.ne(0).any().item<bool>());
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), Nb));
  const int64_t rows = K + 1 + (shifted ? Oh * Ow : 0);
  auto part = torch::zeros({nt, rows, M}, x.options());  // each thread's dW (K, M), db and S
  const int64_t s[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  auto sum = part.select(0, 0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "zero_skip_sums", [&] {
    zero_skip_impl<scalar_t>(x.data_ptr<scalar_t>(), make_grad_of(scalar_t(0)), scratch, sk.data_ptr<scalar_t>(),
                             part.data_ptr<scalar_t>(), Nb, C, H, W, Oh, Ow, M, s, p, nt, shifted);
    for (int64_t th = 1; th < nt; ++th) sum.add_(part.select(0, th));  // in thread order
    if (shifted) zero_skip_finish<scalar_t>(sum.data_ptr<scalar_t>(), sk.data_ptr<scalar_t>(), C, H, W, Oh, Ow, M, p);
  });
  return {sum.narrow(0, 0, K).t().contiguous().view({M, C, p[0], p[1]}), sum.select(0, K).clone()};
}

std::vector<torch::Tensor> zero_skip_weight_grad(const torch::Tensor& x, const torch::Tensor& gy,
                                                 const torch::Tensor& skip, const std::vector<int64_t>& p) {
  TORCH_CHECK(p.size() == 8, "zero_skip_weight_grad: needs kh, kw, sh, sw, pt, pl, dh, dw");
  TORCH_CHECK(x.dim() == 4 && gy.dim() == 4 && gy.is_contiguous() && x.scalar_type() == gy.scalar_type() &&
                  x.size(0) == gy.size(0) && skip.dim() == 1 && skip.size(0) == x.size(1) &&
                  skip.scalar_type() == x.scalar_type(),
              "zero_skip_weight_grad: x (Nb, C, H, W), a contiguous gy (Nb, Oh, Ow, M) and skip (C,), of x's dtype");
  const int64_t Oh = gy.size(1), Ow = gy.size(2), M = gy.size(3), OM = Oh * Ow * M;
  auto grads = [&](auto zero) {  // image b's gradient: its rows of gy
    using T = decltype(zero);
    const T* G = gy.data_ptr<T>();
    return [G, OM](int64_t b, T*) { return G + b * OM; };
  };
  return zero_skip_sums(x, skip, Oh, Ow, M, p, false, grads);
}

// ----------------------------------------------------------------------------- conv + max-pool
// A first block, conv -> max_pool2d (-> ReLU), in one pass per image, for an exact convolution
// whose input needs no gradient (stride 1, dilation 1, groups 1). The convolution's output
// (Oh, Ow, M) lives in a thread's scratch only; the block returns the pooled output and, per
// pooled value, the position of its maximum in the pooling window (uint8, row-major in the
// k x k window; 255 where the ReLU passes no gradient). With s[c] the input channel's common
// value and x' = x - s (zero where x == s):
//   y[o, m] = base[o, m] + sum over non-zero x'[c, y, x] of x' * W[m, c, i, j],  o = (y + pt - i, x + pl - j),
//   base[o, m] = b[m] + sum over the taps of o inside the image of W[m, c, i, j] * s[c]
// (F.conv2d's sums, regrouped). The max and its position follow ATen's max_pool2d on the CPU:
// the window scanned row by row, a value taken if greater than the running max or NaN.
// x: (Nb, C, H, W) any strides; wt: (C, kh, kw, M) contiguous; base: (Oh, Ow, M) contiguous;
// skip: (C,); p: kh, kw, pt, pl, pool k, pool s, pool p, relu.
// Returns (out (Nb, Ph, Pw, M), idx (Nb, Ph, Pw, M) uint8).
template <typename T>
void conv_pool_fwd_impl(const T* __restrict X, const int64_t* st, const T* __restrict Wt, const T* __restrict base,
                        const T* Sk, T* __restrict out, uint8_t* __restrict idx, int64_t Nb, int64_t C, int64_t H,
                        int64_t W, int64_t M, const std::vector<int64_t>& p) {
  const int64_t kh = p[0], kw = p[1], pt = p[2], pl = p[3], pk = p[4], ps = p[5], pp = p[6];
  const bool relu = p[7] != 0;
  const int64_t Oh = H + 2 * pt - kh + 1, Ow = W + 2 * pl - kw + 1;
  const int64_t Ph = (Oh + 2 * pp - pk) / ps + 1, Pw = (Ow + 2 * pp - pk) / ps + 1;
  const int64_t O = Oh * Ow;
  at::parallel_for(0, Nb, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> Y(O * M), mx(M), id(M);
    for (int64_t b = b0; b < b1; ++b) {
      std::memcpy(Y.data(), base, sizeof(T) * O * M);
      for (int64_t c = 0; c < C; ++c) {
        const T s = Sk[c];
        for (int64_t iy = 0; iy < H; ++iy)
          for (int64_t ix = 0; ix < W; ++ix) {
            const T xv = X[b * st[0] + c * st[1] + iy * st[2] + ix * st[3]];
            if (xv == s) continue;
            const T v = xv - s;
            for (int64_t i = 0; i < kh; ++i) {
              const int64_t oy = iy + pt - i;
              if (oy < 0 || oy >= Oh) continue;
              for (int64_t j = 0; j < kw; ++j) {
                const int64_t ox = ix + pl - j;
                if (ox < 0 || ox >= Ow) continue;
                T* __restrict yr = Y.data() + (oy * Ow + ox) * M;
                const T* __restrict wr = Wt + ((c * kh + i) * kw + j) * M;
#pragma omp simd
                for (int64_t m = 0; m < M; ++m) yr[m] += v * wr[m];
              }
            }
          }
      }
      for (int64_t py = 0; py < Ph; ++py) {
        const int64_t h0 = py * ps - pp, ha = std::max<int64_t>(h0, 0), he = std::min(h0 + pk, Oh);
        for (int64_t px = 0; px < Pw; ++px) {
          const int64_t w0 = px * ps - pp, wa = std::max<int64_t>(w0, 0), we = std::min(w0 + pk, Ow);
          T* __restrict mxp = mx.data();
          T* __restrict idp = id.data();  // the position as a T: one lane width, vectorised
          const T first = T((ha - h0) * pk + (wa - w0));
#pragma omp simd
          for (int64_t m = 0; m < M; ++m) {
            mxp[m] = -std::numeric_limits<T>::infinity();
            idp[m] = first;
          }
          for (int64_t ih = ha; ih < he; ++ih)
            for (int64_t iw = wa; iw < we; ++iw) {
              const T* __restrict yr = Y.data() + (ih * Ow + iw) * M;
              const T k = T((ih - h0) * pk + (iw - w0));
#pragma omp simd
              for (int64_t m = 0; m < M; ++m) {
                const T v = yr[m];
                const bool take = v > mxp[m] || v != v;
                mxp[m] = take ? v : mxp[m];
                idp[m] = take ? k : idp[m];
              }
            }
          T* __restrict o = out + ((b * Ph + py) * Pw + px) * M;
          uint8_t* __restrict q = idx + ((b * Ph + py) * Pw + px) * M;
          if (relu) {
#pragma omp simd
            for (int64_t m = 0; m < M; ++m) {
              const T v = mxp[m];
              const bool pass = v > T(0);
              o[m] = pass || v != v ? v : T(0);
              idp[m] = pass ? idp[m] : T(255);
            }
          } else {
#pragma omp simd
            for (int64_t m = 0; m < M; ++m) o[m] = mxp[m];
          }
#pragma omp simd
          for (int64_t m = 0; m < M; ++m) q[m] = (uint8_t)(int32_t)idp[m];
        }
      }
    }
  });
}

// base (Oh, Ow, M) = b[m] + sum over the in-image taps (i, j) of o of sum_c W[m, c, i, j] * s[c]
template <typename T>
void conv_pool_base(const T* Wt, const T* bias, const T* Sk, T* base, int64_t C, int64_t H, int64_t W, int64_t M,
                    int64_t kh, int64_t kw, int64_t pt, int64_t pl) {
  const int64_t Oh = H + 2 * pt - kh + 1, Ow = W + 2 * pl - kw + 1;
  std::vector<T> S(kh * kw * M, T(0));  // S[i, j, m] = sum_c W[m, c, i, j] * s[c]
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < kh * kw; ++t)
      for (int64_t m = 0; m < M; ++m) S[t * M + m] += Wt[(c * kh * kw + t) * M + m] * Sk[c];
  std::vector<T> A(kw * M);  // A[j, m] = sum over the in-image rows i of oy of S[i, j, m]
  for (int64_t oy = 0; oy < Oh; ++oy) {
    std::fill(A.begin(), A.end(), T(0));
    for (int64_t i = 0; i < kh; ++i) {
      const int64_t iy = oy - pt + i;
      if (iy < 0 || iy >= H) continue;
      for (int64_t t = 0; t < kw * M; ++t) A[t] += S[i * kw * M + t];
    }
    for (int64_t ox = 0; ox < Ow; ++ox) {
      T* r = base + (oy * Ow + ox) * M;
      for (int64_t m = 0; m < M; ++m) r[m] = bias ? bias[m] : T(0);
      for (int64_t j = 0; j < kw; ++j) {
        const int64_t ix = ox - pl + j;
        if (ix < 0 || ix >= W) continue;
        for (int64_t m = 0; m < M; ++m) r[m] += A[j * M + m];
      }
    }
  }
}

std::vector<torch::Tensor> conv_pool_forward(const torch::Tensor& x, const torch::Tensor& weight,
                                             const c10::optional<torch::Tensor>& bias, const torch::Tensor& skip,
                                             const std::vector<int64_t>& p) {
  TORCH_CHECK(p.size() == 6, "conv_pool_forward: needs pt, pl, pool k, pool s, pool p, relu");
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4 && x.scalar_type() == weight.scalar_type() &&
                  weight.size(1) == x.size(1) && skip.dim() == 1 && skip.size(0) == x.size(1) &&
                  skip.scalar_type() == x.scalar_type() && x.device().is_cpu(),
              "conv_pool_forward: x (Nb, C, H, W), weight (M, C, kh, kw) and skip (C,) of one dtype, on the CPU");
  const int64_t Nb = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t M = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  const std::vector<int64_t> q = {kh, kw, p[0], p[1], p[2], p[3], p[4], p[5]};
  const int64_t Oh = H + 2 * p[0] - kh + 1, Ow = W + 2 * p[1] - kw + 1;
  TORCH_CHECK(Oh > 0 && Ow > 0 && p[2] >= 1 && p[2] <= 15 && p[3] >= 1 && 2 * p[4] <= p[2] && Oh + 2 * p[4] >= p[2] &&
                  Ow + 2 * p[4] >= p[2],
              "conv_pool_forward: a pooling window of 1-15 and a padding of at most half of it, inside the output");
  const int64_t Ph = (Oh + 2 * p[4] - p[2]) / p[3] + 1, Pw = (Ow + 2 * p[4] - p[2]) / p[3] + 1;
  auto wt = weight.permute({1, 2, 3, 0}).contiguous();  // (C, kh, kw, M)
  auto sk = skip.contiguous();
  auto base = torch::empty({Oh, Ow, M}, x.options());
  auto out = torch::empty({Nb, Ph, Pw, M}, x.options());
  auto idx = torch::empty({Nb, Ph, Pw, M}, x.options().dtype(torch::kUInt8));
  torch::Tensor b;
  if (bias.has_value()) b = bias->contiguous();
  const int64_t s[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_pool_forward", [&] {
    conv_pool_base<scalar_t>(wt.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                             sk.data_ptr<scalar_t>(), base.data_ptr<scalar_t>(), C, H, W, M, kh, kw, p[0], p[1]);
    conv_pool_fwd_impl<scalar_t>(x.data_ptr<scalar_t>(), s, wt.data_ptr<scalar_t>(), base.data_ptr<scalar_t>(),
                                 sk.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), idx.data_ptr<uint8_t>(), Nb, C, H,
                                 W, M, q);
  });
  return {out, idx};
}

// max_pool2d's backward for one image: buf (Oh, Ow, M) = 0, then each pooled gradient g
// (Ph, Pw, M) added at its window's position id (255: none)
template <typename T>
void route_pooled(const T* __restrict G, const uint8_t* __restrict I, T* __restrict buf, int64_t Oh, int64_t Ow,
                  int64_t Ph, int64_t Pw, int64_t M, int64_t pk, int64_t ps, int64_t pp) {
  std::fill(buf, buf + Oh * Ow * M, T(0));
  for (int64_t py = 0; py < Ph; ++py) {
    const int64_t h0 = py * ps - pp;
    for (int64_t px = 0; px < Pw; ++px) {
      const int64_t w0 = px * ps - pp;
      const T* __restrict g = G + (py * Pw + px) * M;
      const uint8_t* __restrict id = I + (py * Pw + px) * M;
      for (int64_t di = 0; di < pk; ++di) {
        const int64_t ih = h0 + di;
        if (ih < 0 || ih >= Oh) continue;
        for (int64_t dj = 0; dj < pk; ++dj) {
          const int64_t iw = w0 + dj;
          if (iw < 0 || iw >= Ow) continue;
          const uint8_t k = (uint8_t)(di * pk + dj);
          T* __restrict r = buf + (ih * Ow + iw) * M;
#pragma omp simd
          for (int64_t m = 0; m < M; ++m) r[m] += id[m] == k ? g[m] : T(0);
        }
      }
    }
  }
}

// The weight and bias gradients of conv_pool_forward's block from the pooled output's gradient
// gp (Nb, Ph, Pw, M) contiguous and idx: each image's convolution-output gradient is routed
// into a thread's scratch (what max_pool2d's backward writes, never in memory as a whole), then
// zero_skip_impl's sums. p: kh, kw, pt, pl, pool k, pool s, pool p.
std::vector<torch::Tensor> conv_pool_weight_grad(const torch::Tensor& x, const torch::Tensor& gp,
                                                 const torch::Tensor& idx, const torch::Tensor& skip,
                                                 const std::vector<int64_t>& p) {
  TORCH_CHECK(p.size() == 7, "conv_pool_weight_grad: needs kh, kw, pt, pl, pool k, pool s, pool p");
  TORCH_CHECK(x.dim() == 4 && gp.dim() == 4 && gp.is_contiguous() && idx.is_contiguous() &&
                  idx.scalar_type() == torch::kUInt8 && idx.sizes() == gp.sizes() &&
                  x.scalar_type() == gp.scalar_type() && x.size(0) == gp.size(0) && skip.dim() == 1 &&
                  skip.size(0) == x.size(1) && skip.scalar_type() == x.scalar_type(),
              "conv_pool_weight_grad: x (Nb, C, H, W), contiguous gp and idx (Nb, Ph, Pw, M) and skip (C,)");
  const int64_t kh = p[0], kw = p[1], pk = p[4], ps = p[5], pp = p[6];
  const int64_t Oh = x.size(2) + 2 * p[2] - kh + 1, Ow = x.size(3) + 2 * p[3] - kw + 1;
  const int64_t Ph = gp.size(1), Pw = gp.size(2), M = gp.size(3);
  TORCH_CHECK(Ph == (Oh + 2 * pp - pk) / ps + 1 && Pw == (Ow + 2 * pp - pk) / ps + 1,
              "conv_pool_weight_grad: gp's size is not the pooled output's");
  const std::vector<int64_t> q = {kh, kw, 1, 1, p[2], p[3], 1, 1};
  auto grads = [&](auto zero) {  // max_pool2d's backward for image b, in buf: each pooled gradient at its maximum
    using T = decltype(zero);
    const T* G = gp.data_ptr<T>();
    const uint8_t* I = idx.data_ptr<uint8_t>();
    return [=](int64_t b, T* buf) {
      route_pooled<T>(G + b * Ph * Pw * M, I + b * Ph * Pw * M, buf, Oh, Ow, Ph, Pw, M, pk, ps, pp);
      return (const T*)buf;
    };
  };
  return zero_skip_sums(x, skip, Oh, Ow, M, q, true, grads);
}

}  // namespace


// ids (Nb, Hp, Wp) int64 -> (ranks (Nb, Hp, Wp) int32, slot_map (nb, G) int32, counts (nb,
// Cmax) int64): compact's slots and counts for the blocks of the per-pixel chain.
std::vector<torch::Tensor> pixel_compact(torch::Tensor ids, std::vector<int64_t> geo) {
  check_cpu_contig(ids, "ids");
  const Geo g = pixel_geo(geo, "pixel_compact");
  TORCH_CHECK(ids.scalar_type() == torch::kInt64 && ids.numel() == g.P(), "pixel_compact: ids must be int64 (Nb, Hp, Wp)");
  const int64_t nb = g.kh * g.kw;
  const int64_t* I = ids.data_ptr<int64_t>();
  const auto crow = covered_axis(g.Hp, g.kh, g.dh, g.Oh), ccol = covered_axis(g.Wp, g.kw, g.dw, g.Ow);
  // fn(p) for every covered pixel p, image by image, row by row
  auto for_covered = [&](auto fn) {
    for (int64_t row = 0; row < g.Nb * g.Hp; ++row)
      if (crow[row % g.Hp])
        for (int64_t wp = 0, p = row * g.Wp; wp < g.Wp; ++wp, ++p)
          if (ccol[wp]) fn(p);
  };
  int64_t kmax = -1, kmin = 0;
  for_covered([&](int64_t p) {
    kmax = std::max(kmax, I[p]);
    kmin = std::min(kmin, I[p]);
  });
  TORCH_CHECK(kmin >= 0, "pixel_compact: cluster ids must be non-negative");
  auto ranks = torch::full({g.Nb, g.Hp, g.Wp}, -1, ids.options().dtype(torch::kInt32));
  int32_t* R = ranks.data_ptr<int32_t>();
  int64_t G = 0;
  if (kmax < (int64_t(1) << 22)) {  // small ids: rank them with a table
    std::vector<int32_t> rank(kmax + 1, 0);
    for_covered([&](int64_t p) { rank[I[p]] = 1; });
    for (auto& v : rank) v = v ? G++ : -1;
    for_covered([&](int64_t p) { R[p] = rank[I[p]]; });
  } else {
    std::vector<int64_t> u;
    for_covered([&](int64_t p) { u.push_back(I[p]); });
    std::sort(u.begin(), u.end());
    u.erase(std::unique(u.begin(), u.end()), u.end());
    G = u.size();
    for_covered([&](int64_t p) { R[p] = std::lower_bound(u.begin(), u.end(), I[p]) - u.begin(); });
  }
  // members per (block, key rank): a block's members are the pixels of its tap's window
  std::vector<int64_t> cnt(nb * G, 0);
  const int64_t A = g.Hp, B = g.Wp;
  if ((A + 1) * (B + 1) * G <= (int64_t(1) << 22)) {  // per (row, column, key), summed over the
    std::vector<int64_t> grid((A + 1) * (B + 1) * G, 0);  // images, then 2D prefix sums
    for (int64_t row = 0; row < g.Nb * A; ++row) {
      int64_t* cell = grid.data() + ((row % A + 1) * (B + 1) + 1) * G;
      const int32_t* r = R + row * B;
      for (int64_t wp = 0; wp < B; ++wp)
        if (r[wp] >= 0) cell[wp * G + r[wp]]++;
    }
    prefix2d(grid.data(), 1, A, B, G);
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t a0 = (b / g.kw) * g.dh, a1 = a0 + g.Oh, c0 = (b % g.kw) * g.dw, c1 = c0 + g.Ow;
      const int64_t* p11 = grid.data() + (a1 * (B + 1) + c1) * G;
      const int64_t* p01 = grid.data() + (a0 * (B + 1) + c1) * G;
      const int64_t* p10 = grid.data() + (a1 * (B + 1) + c0) * G;
      const int64_t* p00 = grid.data() + (a0 * (B + 1) + c0) * G;
      for (int64_t r = 0; r < G; ++r) cnt[b * G + r] = p11[r] - p01[r] - p10[r] + p00[r];
    }
  } else {  // many keys: count each block's window
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        int64_t* c = cnt.data() + b * G;
        for (int64_t bb = 0; bb < g.Nb; ++bb)
          for (int64_t oh = 0; oh < g.Oh; ++oh) {
            const int32_t* r = R + (bb * g.Hp + oh) * g.Wp + g.tap_offset(b);
            for (int64_t ow = 0; ow < g.Ow; ++ow) c[r[ow]]++;
          }
      }
    });
  }
  auto slot_map = torch::full({nb, G}, -1, ids.options().dtype(torch::kInt32));
  int32_t* SM = slot_map.data_ptr<int32_t>();
  int64_t cmax = 0;
  for (int64_t b = 0; b < nb; ++b) {
    int32_t s = 0;
    for (int64_t r = 0; r < G; ++r)
      if (cnt[b * G + r] > 0) SM[b * G + r] = s++;
    cmax = std::max<int64_t>(cmax, s);
  }
  auto counts = torch::zeros({nb, cmax}, ids.options());
  int64_t* C = counts.data_ptr<int64_t>();
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t r = 0; r < G; ++r)
      if (SM[b * G + r] >= 0) C[b * cmax + SM[b * G + r]] = cnt[b * G + r];
  return {ranks, slot_map, counts};
}

// The generic chain's inverse (nb, N) int32 of the per-pixel chain's ranks and slot_map.
torch::Tensor pixel_inverse(torch::Tensor ranks, torch::Tensor slot_map, std::vector<int64_t> geo) {
  const Geo g = pixel_geo(geo, "pixel_inverse");
  check_pixel_maps(g, ranks, slot_map, "pixel_inverse");
  const int64_t nb = slot_map.size(0), G = slot_map.size(1), N = g.N(), rows = g.Nb * g.Oh;
  auto inverse = torch::empty({nb, N}, ranks.options());
  const int32_t* R = ranks.data_ptr<int32_t>();
  const int32_t* SM = slot_map.data_ptr<int32_t>();
  int32_t* V = inverse.data_ptr<int32_t>();
  at::parallel_for(0, nb * g.Nb, 1, [&](int64_t i0, int64_t i1) {  // (block, image) pairs
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / g.Nb, bb = i % g.Nb;
      const int32_t* src = R + bb * g.Hp * g.Wp + g.tap_offset(b);
      const int32_t* sm = SM + b * G;
      int32_t* dst = V + b * N + bb * rows / g.Nb * g.Ow;
      for (int64_t oh = 0; oh < g.Oh; ++oh) gather_run(dst + oh * g.Ow, sm, src + oh * g.Wp, g.Ow);
    }
  });
  return inverse;
}

// ||pixel||, (Nb, Hp, Wp): the member norms of the per-pixel chain (member_norms' per-unit
// norms, the same pass).
torch::Tensor pixel_norms(torch::Tensor xp) {
  check_cpu_contig(xp, "xp");
  TORCH_CHECK(xp.dim() == 4, "pixel_norms: xp must be (Nb, Hp, Wp, C)");
  auto out = torch::empty({xp.size(0), xp.size(1), xp.size(2)}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "pixel_norms", [&] {
    unit_squares<scalar_t>(xp.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), out.numel(), xp.size(3), true);
  });
  return out;
}

// The two per-pixel chunk-path kernels' common part: their checks (the maps, the counts, an
// input inside the padded frame), the geometry `g` and the chunk plan built from the maps;
// false where the generic chain would take the per-row kernels.
bool pixel_chunk_plan(ChunkPlan& cp, Geo& g, const char* what, const torch::Tensor& ranks,
                      const torch::Tensor& slot_map, const torch::Tensor& counts, const std::vector<int64_t>& geo,
                      const torch::Tensor& pieces_t, int64_t mode, const Interior& in, int64_t cmax) {
  check_cpu_contig(counts, "counts");
  g = pixel_geo(geo, what);
  check_pixel_maps(g, ranks, slot_map, what);
  TORCH_CHECK(in.H < 0 || (in.pt >= 0 && in.pl >= 0 && in.W >= 0 && in.pt + in.H <= g.Hp && in.pl + in.W <= g.Wp),
              what, ": the input must lie inside the padded frame");
  return pixel_plan(cp, g, read_pieces(pieces_t), ranks.data_ptr<int32_t>(), slot_map.data_ptr<int32_t>(),
                    slot_map.size(1), cmax, mode, in);
}

// centroid_means (chunk path) from the per-pixel maps; None where the generic chain would
// take the per-row kernels (the caller then forms the inverse and takes them too).
c10::optional<torch::Tensor> pixel_centroid_means(torch::Tensor xp, torch::Tensor ranks, torch::Tensor slot_map,
                                                  torch::Tensor counts, std::vector<int64_t> geo, torch::Tensor pieces_t,
                                                  int64_t mode, int64_t pt, int64_t pl, int64_t H, int64_t W) {
  check_cpu_contig(xp, "xp");
  const int64_t nb = slot_map.size(0), cmax = counts.size(1);
  const Interior in{pt, pl, H, W};
  Geo g;
  ChunkPlan cp;
  if (!pixel_chunk_plan(cp, g, "pixel_centroid_means", ranks, slot_map, counts, geo, pieces_t, mode, in, cmax))
    return c10::nullopt;
  auto S = torch::empty({nb, cmax, g.L}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "pixel_centroid_means", [&] {
    chunk_means_impl<scalar_t>(xp.data_ptr<scalar_t>(), counts.data_ptr<int64_t>(), S.data_ptr<scalar_t>(), g, cp, nb,
                               cmax);
  });
  return S;
}

// centroid_means_backward (chunk path) from the per-pixel maps; None as above.
c10::optional<torch::Tensor> pixel_centroid_means_backward(torch::Tensor g_cent, torch::Tensor ranks,
                                                           torch::Tensor slot_map, torch::Tensor counts,
                                                           std::vector<int64_t> geo, torch::Tensor pieces_t,
                                                           int64_t mode, int64_t pt, int64_t pl, int64_t H, int64_t W) {
  check_cpu_contig(g_cent, "g_cent");
  const int64_t nb = slot_map.size(0), cmax = g_cent.size(1);
  const Interior in{pt, pl, H, W};
  Geo g;
  ChunkPlan cp;
  if (!pixel_chunk_plan(cp, g, "pixel_centroid_means_backward", ranks, slot_map, counts, geo, pieces_t, mode, in,
                        cmax))
    return c10::nullopt;
  auto D = in.H < 0 ? torch::empty({g.Nb, g.Hp, g.Wp, g.C}, g_cent.options())
                    : torch::empty({g.Nb, g.C, in.H, in.W}, g_cent.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES(g_cent.scalar_type(), "pixel_centroid_means_backward", [&] {
    chunk_means_backward_impl<scalar_t>(g_cent.data_ptr<scalar_t>(), counts.data_ptr<int64_t>(), D.data_ptr<scalar_t>(),
                                        g, cp, nb, cmax, in);
  });
  return D;
}

// reconstruct from the per-pixel maps and (optional) per-pixel scales: the tiles' slots and
// scales are looked up through each row's pixels instead of read from (nb, N) tensors.
torch::Tensor pixel_reconstruct(torch::Tensor yc, torch::Tensor ranks, torch::Tensor slot_map,
                                c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> scales,
                                std::vector<int64_t> geo) {
  check_cpu_contig(yc, "yc");
  const Geo g = pixel_geo(geo, "pixel_reconstruct");
  check_pixel_maps(g, ranks, slot_map, "pixel_reconstruct");
  const int64_t nb = yc.size(0), cmax = yc.size(1), M = yc.size(2), N = g.N(), G = slot_map.size(1);
  TORCH_CHECK(nb == slot_map.size(0), "pixel_reconstruct: one table per tap");
  auto out = torch::empty({N, M}, yc.options());
  torch::Tensor b, w;
  if (bias.has_value()) b = bias->to(yc.scalar_type()).contiguous();
  if (scales.has_value()) {
    w = scales->to(yc.scalar_type()).contiguous();
    TORCH_CHECK(w.numel() == g.P(), "pixel_reconstruct: scales must be (Nb, Hp, Wp)");
  }
  const int32_t* R = ranks.data_ptr<int32_t>();
  const int32_t* SM = slot_map.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(yc.scalar_type(), "pixel_reconstruct", [&] {
    const scalar_t* Wp = scales.has_value() ? w.data_ptr<scalar_t>() : nullptr;
    const auto off = tap_offsets(g);
    auto fill = [&](int32_t* vt, scalar_t* wt, int64_t g0, int64_t gn, int64_t n0, int64_t nt) {
      for_row_runs(g, n0, nt, [&](int64_t i0, int64_t a, int64_t len) {
        for (int64_t bl = 0; bl < gn; ++bl) {
          const int64_t p = a + off[g0 + bl];
          const int32_t* r = R + p;
          const int32_t* sm = SM + (g0 + bl) * G;
          int32_t* v = vt + i0 * gn + bl;
          for (int64_t i = 0; i < len; ++i) v[i * gn] = sm[r[i]];
          if (Wp) {
            const scalar_t* wr = Wp + p;
            scalar_t* wv = wt + i0 * gn + bl;
            for (int64_t i = 0; i < len; ++i) wv[i * gn] = wr[i];
          }
        }
      });
    };
    reconstruct_tiles<scalar_t>(yc.data_ptr<scalar_t>(), fill, Wp != nullptr,
                                bias.has_value() ? b.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), nb, cmax,
                                N, M);
  });
  return out;
}

// reconstruct_scales_grad from the per-pixel maps: d_scales[p] = sum over the taps b that read
// pixel p (row n = p - offset(b) inside the output) of dy[n] . yc[b, slot_map[b, ranks[p]]],
// (Nb, Hp, Wp). Each pixel keeps V = 64 / sizeof(T) lane sums over all its taps and channel
// chunks (lane j takes the channels = j mod V; a GCC/Clang vector type while one dot runs),
// summed pairwise once at the end: one horizontal sum per pixel instead of one per (tap, row).
// Ad hoc, CifarNet conv2's tensors, the same loop: 2.6-3.0 ms this way, 5.1-5.9 ms with an
// `omp simd` reduction per dot; the generic kernel on the formed inverse, folded, 4.0-5.3 ms.
// The order is fixed (taps, then chunks, per lane; lanes pairwise), so the result does not
// depend on the thread count; it differs from the generic kernel's folded rows by rounding.
// Each thread owns whole padded rows: no two threads write one pixel.
template <typename T>
void pixel_scales_backward_impl(const T* D, const T* Y, const int32_t* R, const int32_t* SM, T* O, const Geo& g,
                                int64_t nb, int64_t cmax, int64_t G, int64_t M) {
  constexpr int64_t V = 64 / sizeof(T);
  typedef T vec __attribute__((vector_size(64)));
  at::parallel_for(0, g.Nb * g.Hp, 1, [&](int64_t r0, int64_t r1) {
    std::vector<T> lanes(g.Wp * V);
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t bb = row / g.Hp, ph = row % g.Hp;
      const int32_t* rk = R + row * g.Wp;
      std::fill(lanes.begin(), lanes.end(), T(0));
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t oh = ph - (b / g.kw) * g.dh, shift = (b % g.kw) * g.dw;
        if (oh < 0 || oh >= g.Oh) continue;
        // this tap reads pixel pw = ow + shift for the output column ow
        const int64_t w1 = std::min(g.Wp, g.Ow + shift);
        const int32_t* sm = SM + b * G;
        const T* yb = Y + b * cmax * M;
        const T* drow = D + (bb * g.Oh + oh) * g.Ow * M;
        for (int64_t pw = shift; pw < w1; ++pw) {
          const T* gr = drow + (pw - shift) * M;
          const T* y = yb + int64_t(sm[rk[pw]]) * M;
          T* l = lanes.data() + pw * V;
          vec a, u, w;
          std::memcpy(&a, l, sizeof a);
          int64_t k = 0;
          for (; k + V <= M; k += V) {
            std::memcpy(&u, gr + k, sizeof u);
            std::memcpy(&w, y + k, sizeof w);
            a += u * w;
          }
          std::memcpy(l, &a, sizeof a);
          for (int64_t j = 0; k + j < M; ++j) l[j] += gr[k + j] * y[k + j];
        }
      }
      T* o = O + row * g.Wp;
      for (int64_t pw = 0; pw < g.Wp; ++pw) {
        T* l = lanes.data() + pw * V;
        for (int64_t h = V / 2; h > 0; h /= 2)
          for (int64_t j = 0; j < h; ++j) l[j] += l[j + h];
        o[pw] = l[0];
      }
    }
  });
}

torch::Tensor pixel_scales_backward(torch::Tensor dy_rows, torch::Tensor yc, torch::Tensor ranks,
                                    torch::Tensor slot_map, std::vector<int64_t> geo) {
  check_cpu_contig(dy_rows, "dy_rows");
  check_cpu_contig(yc, "yc");
  const Geo g = pixel_geo(geo, "pixel_scales_backward");
  check_pixel_maps(g, ranks, slot_map, "pixel_scales_backward");
  const int64_t nb = yc.size(0), cmax = yc.size(1), M = yc.size(2), G = slot_map.size(1);
  TORCH_CHECK(nb == slot_map.size(0) && dy_rows.size(0) == g.N() && dy_rows.size(1) == M &&
                  dy_rows.scalar_type() == yc.scalar_type(),
              "pixel_scales_backward: dy_rows must be (N, M) of yc's dtype and yc one table per tap");
  auto out = torch::empty({g.Nb, g.Hp, g.Wp}, yc.options());
  AT_DISPATCH_FLOATING_TYPES(yc.scalar_type(), "pixel_scales_backward", [&] {
    pixel_scales_backward_impl<scalar_t>(dy_rows.data_ptr<scalar_t>(), yc.data_ptr<scalar_t>(),
                                         ranks.data_ptr<int32_t>(), slot_map.data_ptr<int32_t>(),
                                         out.data_ptr<scalar_t>(), g, nb, cmax, G, M);
  });
  return out;
}

// reconstruct_backward from the per-pixel maps and scales: each (block, row tile) gets its
// slots and scales through the rows' pixels, then scatter_runs as the generic kernel.
// The per-pixel chain's walk for scatter_walk, with the table indexed by key rank (G rows per
// block): row n's rank is R[p] and its scale W[p], p walking the pixels block `off`'s window
// reads (one step along an output row, a jump at its end), so each row costs one index load,
// as ArrayWalk's inverse[b, n]. Within a block, present ranks and slots correspond one to one
// and in order, so the runs, their sums and the order they meet the table are those of the
// slots (the caller moves each rank's row to its slot).
template <typename T>
struct PixelWalk {
  const int32_t* R;
  const T* W;
  int64_t off;
  RowWalk rw;
  int64_t p, left;
  PixelWalk(const Geo& g, const int32_t* R_, const T* W_, int64_t off_, int64_t n0)
      : R(R_), W(W_), off(off_), rw(g, n0), p(rw.anchor() + off_), left(rw.left()) {}
  int64_t slot() const { return R[p]; }
  T weight() const { return W[p]; }
  void next() {  // past the last row p only names a pixel, which is never read
    if (--left > 0) {
      ++p;
    } else {
      rw.advance(rw.left());
      p = rw.anchor() + off;
      left = rw.g.Ow;
    }
  }
};

torch::Tensor pixel_reconstruct_backward(torch::Tensor dy_rows, torch::Tensor ranks, torch::Tensor slot_map,
                                         int64_t cmax, c10::optional<torch::Tensor> scales, std::vector<int64_t> geo) {
  check_cpu_contig(dy_rows, "dy_rows");
  const Geo g = pixel_geo(geo, "pixel_reconstruct_backward");
  check_pixel_maps(g, ranks, slot_map, "pixel_reconstruct_backward");
  const int64_t nb = slot_map.size(0), N = g.N(), M = dy_rows.size(1), G = slot_map.size(1);
  TORCH_CHECK(dy_rows.size(0) == N, "pixel_reconstruct_backward: one gradient row per output position");
  torch::Tensor w;
  if (scales.has_value()) {
    w = scales->to(dy_rows.scalar_type()).contiguous();
    TORCH_CHECK(w.numel() == g.P(), "pixel_reconstruct_backward: scales must be (Nb, Hp, Wp)");
  }
  if (nb < at::get_num_threads()) {  // the generic kernel splits rows, not blocks: give it the inverse
    auto inv = pixel_inverse(ranks, slot_map, geo);
    c10::optional<torch::Tensor> ws;
    if (scales.has_value()) {  // the rows' scales, (nb, N)
      auto wr = torch::empty({nb, N}, w.options());
      AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "pixel_scales", [&] {
        const scalar_t* Wp = w.data_ptr<scalar_t>();
        scalar_t* o = wr.data_ptr<scalar_t>();
        for (int64_t b = 0; b < nb; ++b)
          for (int64_t n = 0; n < N; ++n) o[b * N + n] = Wp[g.anchor(n) + g.tap_offset(b)];
      });
      ws = wr;
    }
    return reconstruct_backward(dy_rows, inv, cmax, ws);
  }
  const int32_t* R = ranks.data_ptr<int32_t>();
  const int32_t* SM = slot_map.data_ptr<int32_t>();
  if (G <= cmax + cmax / 4) {  // a table by key rank (few ranks absent from a block): no lookups
    auto byrank = torch::zeros({nb, G, M}, dy_rows.options());
    torch::Tensor out;
    AT_DISPATCH_FLOATING_TYPES(dy_rows.scalar_type(), "pixel_reconstruct_backward_ranks", [&] {
      const scalar_t* Wp = scales.has_value() ? w.data_ptr<scalar_t>() : nullptr;
      const scalar_t* Gd = dy_rows.data_ptr<scalar_t>();
      scalar_t* T = byrank.data_ptr<scalar_t>();
      const size_t row = sizeof(scalar_t) * M;
      for_block_tiles(nb, N, G * M * (int64_t)sizeof(scalar_t), [&](int64_t b, int64_t n0, int64_t n1) {
        const PixelWalk<scalar_t> walk(g, R, Wp, g.tap_offset(b), n0);
        if (Wp)
          scatter_walk<scalar_t, true>(Gd, walk, T + b * G * M, n0, n1, M);
        else
          scatter_walk<scalar_t, false>(Gd, walk, T + b * G * M, n0, n1, M);
      });
      // Each rank's row to its slot. A small table (the main job's conv2: 1.6 MB) is read
      // into a new (nb, cmax, M) tensor, blocks in parallel. A large one is compacted in
      // place, so that no second buffer of its size is held (session 23: 12 MB at AlexNet
      // conv3's shape, L = C = 192, H = 10): a block's slots number its present ranks in
      // order, so a slot is never above its rank and moving rows in rank order overwrites
      // only rows already moved; then the blocks are packed to (nb, cmax, M) in block order
      // (block b's rows move down, never onto a block still to move).
      const bool in_place = nb * G * M * (int64_t)sizeof(scalar_t) > (int64_t(4) << 20);
      if (!in_place) out = torch::empty({nb, cmax, M}, dy_rows.options());
      scalar_t* O = in_place ? T : out.data_ptr<scalar_t>();
      at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const scalar_t* tb = T + b * G * M;
          scalar_t* ob = O + b * (in_place ? G : cmax) * M;
          int64_t filled = 0;
          for (int64_t r = 0; r < G; ++r) {
            const int32_t s = SM[b * G + r];
            if (s < 0) continue;
            if (ob + s * M != tb + r * M) std::memcpy(ob + s * M, tb + r * M, row);
            ++filled;
          }
          std::memset(ob + filled * M, 0, row * (cmax - filled));  // slots past the block's count
        }
      });
      if (in_place) {
        for (int64_t b = 1; b < nb; ++b) std::memmove(T + b * cmax * M, T + b * G * M, row * cmax);
        out = byrank.resize_({nb, cmax, M});
      }
    });
    return out;
  }
  auto out = torch::zeros({nb, cmax, M}, dy_rows.options());
  AT_DISPATCH_FLOATING_TYPES(dy_rows.scalar_type(), "pixel_reconstruct_backward", [&] {
    const scalar_t* Wp = scales.has_value() ? w.data_ptr<scalar_t>() : nullptr;
    const scalar_t* Gd = dy_rows.data_ptr<scalar_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    for_block_tiles(nb, N, cmax * M * (int64_t)sizeof(scalar_t), [&](int64_t b, int64_t n0, int64_t n1) {
      // the tile's slots and scales first, along its output rows, then the generic scatter
      int32_t vb[kScatterTile];
      scalar_t wb[kScatterTile];
      const int32_t* sm = SM + b * G;
      const int64_t off = g.tap_offset(b);
      for_row_runs(g, n0, n1 - n0, [&](int64_t i0, int64_t a, int64_t len) {
        gather_run(vb + i0, sm, R + a + off, len);
        if (Wp) std::memcpy(wb + i0, Wp + a + off, sizeof(scalar_t) * len);
      });
      scatter_runs(Gd + n0 * M, vb, Wp ? wb : nullptr, O + b * cmax * M, 0, n1 - n0, M);
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pad_nhwc", &pad_nhwc, "zero-padded (Nb, H + t + b, W + l + r, C) copy of x (Nb, H, W, C)");
  m.def("unit_rows", &unit_rows, "c / max(||c||, eps) along the last dimension");
  m.def("unit_rows_backward", &unit_rows_backward, "(g - u (u . g)) / max(||c||, eps)");
  m.def("compact", &compact, "rank the ids present in each block (segment): (inverse, counts)");
  m.def("centroid_means", &centroid_means, "per-slot means of the members' sub-vectors");
  m.def("centroid_means_backward", &centroid_means_backward, "col2im of each member's share of its slot's gradient");
  m.def("reconstruct", &reconstruct, "y[n] = bias + sum_b yc[b, inverse[b, n]]");
  m.def("reconstruct_backward", &reconstruct_backward, "dyc[b, s] = sum of (scaled) dy over slot s of block b");
  m.def("reconstruct_scales_backward", &reconstruct_scales_backward, "d_scales[b, n] = dy[n] . yc[b, inverse[b, n]]");
  m.def("reconstruct_backward_scaled", &reconstruct_backward_scaled, "dyc and d_scales of the scaled reconstruction");
  m.def("member_norms", &member_norms, "norm of every member sub-vector");
  m.def("member_norms_backward", &member_norms_backward, "col2im of g / norm times x (added into out if given)",
        py::arg("g_norms"), py::arg("norms"), py::arg("x"), py::arg("geo"), py::arg("pieces"), py::arg("pt"),
        py::arg("pl"), py::arg("out") = py::none());
  m.def("slot_keys", &slot_keys, "the hash id of every slot (-1 for empty slots)");
  m.def("gather_ids", &gather_ids, "per-block ids gathered from per-pixel unit ids");
  m.def("hash_rows", &hash_rows, "packed sign bits of rows @ planes (Eq. 4), no projections formed");
  m.def("pack_signs", &pack_signs, "packed sign bits of (outer, H, inner) projections");
  m.def("pixel_compact", &pixel_compact, "per-pixel chain: key ranks, per-block slot maps and counts");
  m.def("pixel_inverse", &pixel_inverse, "per-pixel chain: the generic chain's (nb, N) inverse");
  m.def("pixel_norms", &pixel_norms, "per-pixel chain: the norm of every pixel");
  m.def("pixel_centroid_means", &pixel_centroid_means, "per-pixel chain: centroid means (chunk path), else None");
  m.def("pixel_centroid_means_backward", &pixel_centroid_means_backward,
        "per-pixel chain: the centroid means' input gradient (chunk path), else None");
  m.def("pixel_reconstruct", &pixel_reconstruct, "per-pixel chain: y[n] = bias + sum_b w * yc[b, slot_map[b, rank]]");
  m.def("pixel_reconstruct_backward", &pixel_reconstruct_backward, "per-pixel chain: dyc of the reconstruction");
  m.def("pixel_scales_backward", &pixel_scales_backward, "per-pixel chain: the per-pixel scales' gradient");
  m.def("zero_skip_weight_grad", &zero_skip_weight_grad,
        "an exact convolution's weight and bias gradients without the products of zero inputs");
  m.def("conv_pool_forward", &conv_pool_forward, "conv -> max-pool (-> ReLU) of a first block: (out, window index)");
  m.def("conv_pool_weight_grad", &conv_pool_weight_grad, "the block's weight and bias gradients from the pooled one");
}
