// make_targets: the regression targets of data2vec, the average of K parameter-free normalised
// teacher outputs, optionally normalised again, returned only at the masked positions.
//
//   layers:       K tensors [B, T, C] (any strides with a contiguous C), fp32 / bf16 / fp16
//   mask:         optional [B*R, T] bool, True = return this row (R = repeat, default 1)
//   padding_mask: optional [B, T] bool, True = padding (left out of instance-norm statistics)
//   repeat:       R >= 1 masked copies per sample (data2vec 2.0): mask row r selects steps of
//                 sample r / R
//   returns:      [M, C] fp32 (M masked rows in row-major (r, t) order), or [B, T, C] fp32;
//                 padded rows are 0
//
// Norms (as ops/reference.py): instance = per (b, c) over the valid steps of T, layer = per (b, t)
// over C, biased variance, eps inside the square root. Statistics are the reference's shifted
// two-pass ones: subtract a sample of the same row/column first, then the mean, then square, so
// an input of 1e4 + noise keeps its precision.
//
// Two schedules:
// - rows: no instance norm anywhere. Each returned row is finished on its own (K rows of C read
//   once, stats and normalisation from L1), rows split across threads. Rows not returned are
//   never read.
// - tiles: an instance norm somewhere. Work unit = (b, a tile of W channels), W chosen so that one
//   layer's [T, W] tile and the fp32 [T, W] accumulator stay in L2: the statistics pass reads the
//   tile from memory, the variance and normalise-and-accumulate passes re-read it from cache, so
//   each layer output comes from memory once (the contract allows twice). Only returned rows are
//   accumulated unless the final norm is an instance norm, which needs every valid row.
// Repeat (R > 1): a source row (b, t) is an output row once per copy that masks it. Both
// schedules compute it once, into its first output row, and a last pass copies that row to the
// others: nothing of size [B*R, T, C] but the output exists, and the layers are read as for R = 1.
#include <algorithm>
#include <cmath>
#include <utility>

#include "ops.h"

namespace d2v {
namespace {

enum Norm : int64_t { kNoNorm = 0, kInstance = 1, kLayer = 2 };

// One layer as the kernels see it: a typed pointer and the strides of B and T (C is contiguous).
struct Layer {
  const char* data;
  Dtype dtype;
  int64_t element_size;
  int64_t stride_b;
  int64_t stride_t;
  const char* at(int64_t b, int64_t t, int64_t c) const {
    return data + (b * stride_b + t * stride_t + c) * element_size;
  }
};

// Pulls row i of a block into L2 ahead of use (a no-op past the end). The first pass over a tile
// reads it from memory, and its rows are short and strided, which the hardware prefetchers follow
// poorly; the later passes read the tile from L2 (hence locality 2).
template <typename T>
D2V_INLINE void prefetch_block_row(const T* base, int64_t stride, const int64_t* rows, int64_t i,
                                   int64_t n, int64_t w) {
  if (i >= n) return;
  const char* start = reinterpret_cast<const char*>(base + (rows ? rows[i] : i) * stride);
  for (int64_t offset = 0; offset < w * static_cast<int64_t>(sizeof(T)); offset += 64) {
    __builtin_prefetch(start + offset, 0, 2);
  }
}

// Per-(b, c) statistics of the rows `rows[0..n)` (row index r when rows is null) of a [*, W]
// block with row stride `stride`: shift = the first row, mean of (x - shift), and
// rstd = 1 / sqrt(var + eps), var = mean of ((x - shift) - mean)^2 (the reference's two passes).
// Rows are taken four at a time so that each column's running sum stays in a register across
// them; it is added in the same order as one row at a time.
template <typename T>
D2V_INLINE void column_stats(const T* base, int64_t stride, const int64_t* rows, int64_t n,
                             int64_t w, float eps, float* shift, float* mean, float* rstd) {
  constexpr int64_t kAhead = 8;  // rows prefetched ahead of the first pass
  auto row = [&](int64_t i) { return base + (rows ? rows[i] : i) * stride; };
  const T* first = row(0);
  for (int64_t c = 0; c < w; ++c) {
    shift[c] = load(first, c);
    mean[c] = 0.0f;
    rstd[c] = 0.0f;
  }
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int64_t k = 0; k < 4; ++k) prefetch_block_row(base, stride, rows, i + kAhead + k, n, w);
    const T *x0 = row(i), *x1 = row(i + 1), *x2 = row(i + 2), *x3 = row(i + 3);
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) {
      const float s = shift[c];
      float sum = mean[c];
      sum += load(x0, c) - s;
      sum += load(x1, c) - s;
      sum += load(x2, c) - s;
      sum += load(x3, c) - s;
      mean[c] = sum;
    }
  }
  for (; i < n; ++i) {
    prefetch_block_row(base, stride, rows, i + kAhead, n, w);
    const T* x = row(i);
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) mean[c] += load(x, c) - shift[c];
  }
  const float count = static_cast<float>(n);
  for (int64_t c = 0; c < w; ++c) mean[c] /= count;
  for (i = 0; i + 4 <= n; i += 4) {
    const T *x0 = row(i), *x1 = row(i + 1), *x2 = row(i + 2), *x3 = row(i + 3);
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) {
      const float s = shift[c], m = mean[c];
      float squares = rstd[c], d;
      d = (load(x0, c) - s) - m;
      squares += d * d;
      d = (load(x1, c) - s) - m;
      squares += d * d;
      d = (load(x2, c) - s) - m;
      squares += d * d;
      d = (load(x3, c) - s) - m;
      squares += d * d;
      rstd[c] = squares;
    }
  }
  for (; i < n; ++i) {
    const T* x = row(i);
#pragma omp simd
    for (int64_t c = 0; c < w; ++c) {
      float centred = (load(x, c) - shift[c]) - mean[c];
      rstd[c] += centred * centred;
    }
  }
  for (int64_t c = 0; c < w; ++c) rstd[c] = 1.0f / std::sqrt(rstd[c] / count + eps);
}

// The normalised rows v = ((src[src_rows[i]] - shift) - mean) * rstd (per column) combined with
// the running sum of earlier layers and written out:
//   dst[dst_rows[i]] = (partial[i] + v) / divisor      (partial null: v / divisor)
// partial may be dst itself (accumulating in place); a divisor of 1 divides nothing. Folding the
// last layer's division by K and the copy to the output rows into this pass saves two passes over
// the accumulator. A null row list means row i; a dst row of -1 is skipped.
template <typename T>
D2V_INLINE void normalise_rows(const T* src, int64_t src_stride, const int64_t* src_rows, int64_t n,
                               int64_t w, const float* shift, const float* mean, const float* rstd,
                               const float* partial, int64_t partial_stride, float* dst,
                               int64_t dst_stride, const int64_t* dst_rows, float divisor) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t to = dst_rows ? dst_rows[i] : i;
    if (to < 0) continue;
    const T* x = src + (src_rows ? src_rows[i] : i) * src_stride;
    const float* p = partial ? partial + i * partial_stride : nullptr;
    float* y = dst + to * dst_stride;
    if (p && divisor == 1.0f) {
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) y[c] = p[c] + ((load(x, c) - shift[c]) - mean[c]) * rstd[c];
    } else if (p) {
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) {
        y[c] = (p[c] + ((load(x, c) - shift[c]) - mean[c]) * rstd[c]) / divisor;
      }
    } else if (divisor == 1.0f) {
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) y[c] = ((load(x, c) - shift[c]) - mean[c]) * rstd[c];
    } else {
#pragma omp simd
      for (int64_t c = 0; c < w; ++c) y[c] = ((load(x, c) - shift[c]) - mean[c]) * rstd[c] / divisor;
    }
  }
}

// One row of C values normalised over C (norm == kLayer) or as it is, into y (=|+=).
template <typename T>
D2V_INLINE void row_norm(const T* x, int64_t c_size, int64_t norm, float eps, float* y,
                         bool accumulate) {
  float shift = 0.0f, mean = 0.0f, rstd = 1.0f;
  if (norm == kLayer) {
    shift = load(x, 0);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < c_size; ++c) sum += load(x, c) - shift;
    mean = sum / static_cast<float>(c_size);
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t c = 0; c < c_size; ++c) {
      float centred = (load(x, c) - shift) - mean;
      squares += centred * centred;
    }
    rstd = 1.0f / std::sqrt(squares / static_cast<float>(c_size) + eps);
  }
  if (accumulate) {
#pragma omp simd
    for (int64_t c = 0; c < c_size; ++c) y[c] += ((load(x, c) - shift) - mean) * rstd;
  } else {
#pragma omp simd
    for (int64_t c = 0; c < c_size; ++c) y[c] = ((load(x, c) - shift) - mean) * rstd;
  }
}

// ---- multiversioned leaves (dispatch on the storage dtype) -------------------------------

D2V_SIMD_CLONES void column_stats_leaf(const char* base, Dtype dtype, int64_t stride,
                                       const int64_t* rows, int64_t n, int64_t w, float eps,
                                       float* shift, float* mean, float* rstd) {
  D2V_DISPATCH_DTYPE(dtype, T, column_stats(reinterpret_cast<const T*>(base), stride, rows, n, w,
                                            eps, shift, mean, rstd));
}

D2V_SIMD_CLONES void normalise_rows_leaf(const char* src, Dtype dtype, int64_t src_stride,
                                         const int64_t* src_rows, int64_t n, int64_t w,
                                         const float* shift, const float* mean, const float* rstd,
                                         const float* partial, int64_t partial_stride, float* dst,
                                         int64_t dst_stride, const int64_t* dst_rows,
                                         float divisor) {
  D2V_DISPATCH_DTYPE(dtype, T, normalise_rows(reinterpret_cast<const T*>(src), src_stride,
                                              src_rows, n, w, shift, mean, rstd, partial,
                                              partial_stride, dst, dst_stride, dst_rows, divisor));
}

D2V_SIMD_CLONES void row_norm_leaf(const char* x, Dtype dtype, int64_t c_size, int64_t norm,
                                   float eps, float* y, bool accumulate) {
  D2V_DISPATCH_DTYPE(dtype, T,
                     row_norm(reinterpret_cast<const T*>(x), c_size, norm, eps, y, accumulate));
}

D2V_SIMD_CLONES void divide_leaf(float* x, int64_t n, float by) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] /= by;
}

// ---- row bookkeeping ---------------------------------------------------------------------

// Which rows are valid and where each returned row goes, with per-batch row lists.
struct RowMap {
  int64_t batch = 0, steps = 0, returned = 0;
  std::vector<int64_t> out;             // [B*T]: (first) output row, -1 = not returned
  std::vector<uint8_t> valid;           // [B*T]
  std::vector<int64_t> valid_offsets;   // [B+1] into valid_steps
  std::vector<int64_t> valid_steps;     // t of each valid row, grouped by b
  std::vector<std::pair<int64_t, int64_t>> copies;  // (first, later) output rows of a source row
};

RowMap map_rows(int64_t batch, int64_t steps, const std::optional<at::Tensor>& mask,
                const std::optional<at::Tensor>& padding, int64_t repeat) {
  RowMap map;
  map.batch = batch;
  map.steps = steps;
  map.out.assign(batch * steps, -1);
  map.valid.assign(batch * steps, 1);
  const bool* masked = mask ? mask->const_data_ptr<bool>() : nullptr;
  const bool* padded = padding ? padding->const_data_ptr<bool>() : nullptr;
  map.valid_offsets.assign(batch + 1, 0);
  // Output rows in the mask's row-major order; the first copy that selects a source row computes
  // it, the others copy it afterwards (a sample's target is the same for each of its copies).
  if (masked != nullptr) {
    for (int64_t r = 0; r < batch * repeat * steps; ++r) {
      if (!masked[r]) continue;
      const int64_t source = (r / steps / repeat) * steps + r % steps;
      const int64_t row = map.returned++;
      if (map.out[source] < 0) {
        map.out[source] = row;
      } else {
        map.copies.emplace_back(map.out[source], row);
      }
    }
  }
  for (int64_t r = 0; r < batch * steps; ++r) {
    if (masked == nullptr) map.out[r] = map.returned++;
    if (padded != nullptr && padded[r]) map.valid[r] = 0;
    if (map.valid[r]) {
      map.valid_steps.push_back(r % steps);
      map.valid_offsets[r / steps + 1] += 1;
    }
  }
  for (int64_t b = 0; b < batch; ++b) map.valid_offsets[b + 1] += map.valid_offsets[b];
  return map;
}

// ---- the two schedules -------------------------------------------------------------------

constexpr int64_t kRowsAhead = 2;

void prefetch_row(const std::vector<Layer>& layers, int64_t row, int64_t steps, int64_t c_size) {
  const int64_t b = row / steps, t = row % steps;
  for (const Layer& l : layers) {
    const char* start = l.at(b, t, 0);
    for (int64_t offset = 0; offset < c_size * l.element_size; offset += 64) {
      __builtin_prefetch(start + offset);
    }
  }
}

void run_rows(const std::vector<Layer>& layers, const RowMap& map, int64_t c_size,
              int64_t layer_norm, int64_t final_norm, float eps, float* out) {
  std::vector<int64_t> work;  // b * T + t of every valid returned row
  for (int64_t r = 0; r < map.batch * map.steps; ++r) {
    if (map.out[r] >= 0 && map.valid[r]) work.push_back(r);
  }
  const int64_t count = static_cast<int64_t>(work.size());
  const float k = static_cast<float>(layers.size());
#pragma omp parallel num_threads(threads_for(count * c_size * (int64_t)layers.size()))
  {
    std::vector<float> acc(c_size);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < count; ++i) {
      // The returned rows are scattered (a mask), which defeats the hardware prefetchers: fetch
      // the rows a few steps ahead explicitly.
      if (i + kRowsAhead < count) prefetch_row(layers, work[i + kRowsAhead], map.steps, c_size);
      const int64_t b = work[i] / map.steps, t = work[i] % map.steps;
      for (size_t j = 0; j < layers.size(); ++j) {
        row_norm_leaf(layers[j].at(b, t, 0), layers[j].dtype, c_size, layer_norm, eps,
                      acc.data(), j > 0);
      }
      divide_leaf(acc.data(), c_size, k);
      row_norm_leaf(reinterpret_cast<const char*>(acc.data()), Dtype::kFloat, c_size, final_norm,
                    eps, out + map.out[work[i]] * c_size, false);
    }
  }
}

// Tile width: one layer's [T, W] tile plus the fp32 [T, W] accumulator in about 1 MiB (half an
// L2 of current server cores), a multiple of 16 floats, and enough tiles to feed every thread.
int64_t tile_width(int64_t batch, int64_t steps, int64_t c_size, int64_t element_size) {
  constexpr int64_t kBudget = 1 << 20;
  const int64_t threads = at::get_num_threads();
  const int64_t per_column = std::max<int64_t>(1, steps * (element_size + 4));
  int64_t widest = std::max<int64_t>(16, kBudget / per_column);
  int64_t tiles = (c_size + widest - 1) / widest;
  while ((batch * tiles) % threads != 0 && batch * tiles < 4 * threads && tiles < c_size) ++tiles;
  int64_t width = (c_size + tiles - 1) / tiles;
  return std::min(c_size, (width + 15) / 16 * 16);
}

void run_tiles(const std::vector<Layer>& layers, const RowMap& map, int64_t c_size,
               int64_t layer_norm, int64_t final_norm, float eps, float* out) {
  const int64_t steps = map.steps;
  int64_t element_size = 0;
  for (const Layer& l : layers) element_size = std::max(element_size, l.element_size);
  // A per-layer layer norm needs whole rows: one tile spans C.
  const int64_t width =
      layer_norm == kLayer ? c_size : tile_width(map.batch, steps, c_size, element_size);
  const int64_t tiles = (c_size + width - 1) / width;
  const int64_t units = map.batch * tiles;
  const float k = static_cast<float>(layers.size());
  const bool all_valid_rows = final_norm == kInstance;
#pragma omp parallel num_threads(threads_for(map.batch * steps * c_size * (int64_t)layers.size()))
  {
    std::vector<float> acc(steps * width), shift(width), mean(width), rstd(width);
    std::vector<float> zeros(width, 0.0f), ones(width, 1.0f);
    std::vector<int64_t> rows, dst;  // the accumulated steps of b and their output rows
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t b = u / tiles, c0 = (u % tiles) * width, w = std::min(width, c_size - c0);
      const int64_t* valid = map.valid_steps.data() + map.valid_offsets[b];
      const int64_t n_valid = map.valid_offsets[b + 1] - map.valid_offsets[b];
      rows.clear();
      dst.clear();
      for (int64_t i = 0; i < n_valid; ++i) {
        const int64_t to = map.out[b * steps + valid[i]];
        if (all_valid_rows || to >= 0) {
          rows.push_back(valid[i]);
          dst.push_back(to);
        }
      }
      const int64_t n = static_cast<int64_t>(rows.size());
      if (n == 0) continue;
      for (size_t j = 0; j < layers.size(); ++j) {
        const Layer& l = layers[j];
        const char* base = l.at(b, 0, c0);
        if (layer_norm == kLayer) {
          for (int64_t i = 0; i < n; ++i) {
            row_norm_leaf(l.at(b, rows[i], 0), l.dtype, c_size, kLayer, eps,
                          acc.data() + i * width, j > 0);
          }
          continue;
        }
        const bool stats = layer_norm == kInstance;
        if (stats) {
          column_stats_leaf(base, l.dtype, l.stride_t, valid, n_valid, w, eps, shift.data(),
                            mean.data(), rstd.data());
        }
        const float* s = stats ? shift.data() : zeros.data();
        const float* m = stats ? mean.data() : zeros.data();
        const float* r = stats ? rstd.data() : ones.data();
        const float* partial = j > 0 ? acc.data() : nullptr;
        if (j + 1 < layers.size() || all_valid_rows) {
          // Running sum in acc; after the last layer acc holds the average.
          normalise_rows_leaf(base, l.dtype, l.stride_t, rows.data(), n, w, s, m, r, partial,
                              width, acc.data(), width, nullptr, j + 1 < layers.size() ? 1.0f : k);
        } else {
          // No final instance norm: the last layer writes the average to the output rows.
          normalise_rows_leaf(base, l.dtype, l.stride_t, rows.data(), n, w, s, m, r, partial,
                              width, out + c0, c_size, dst.data(), k);
        }
      }
      if (layer_norm == kLayer) divide_leaf(acc.data(), n * width, k);
      if (!all_valid_rows && layer_norm != kLayer) continue;  // written above
      const char* avg = reinterpret_cast<const char*>(acc.data());
      const bool stats = final_norm == kInstance;
      if (stats) {
        column_stats_leaf(avg, Dtype::kFloat, width, nullptr, n, w, eps, shift.data(),
                          mean.data(), rstd.data());
      }
      normalise_rows_leaf(avg, Dtype::kFloat, width, nullptr, n, w,
                          stats ? shift.data() : zeros.data(), stats ? mean.data() : zeros.data(),
                          stats ? rstd.data() : ones.data(), nullptr, 0, out + c0, c_size,
                          dst.data(), 1.0f);
    }
  }
}

// A final layer norm after the tile schedule: in place on the returned valid rows.
void final_layer_norm(const RowMap& map, int64_t c_size, float eps, float* out) {
  const int64_t rows = map.batch * map.steps;
#pragma omp parallel for schedule(static) num_threads(threads_for(map.returned * c_size))
  for (int64_t r = 0; r < rows; ++r) {
    if (map.out[r] < 0 || !map.valid[r]) continue;
    float* y = out + map.out[r] * c_size;
    row_norm_leaf(reinterpret_cast<const char*>(y), Dtype::kFloat, c_size, kLayer, eps, y, false);
  }
}

// The later copies of rows selected by several masks of one sample. The pairs are in output
// order and a sample's copies are adjacent there, so each thread's share re-reads the first rows
// of a few samples only, from cache.
void copy_repeats(const RowMap& map, int64_t c_size, float* out) {
  const int64_t pairs = static_cast<int64_t>(map.copies.size());
#pragma omp parallel for schedule(static) num_threads(threads_for(pairs * c_size))
  for (int64_t i = 0; i < pairs; ++i) {
    const auto [from, to] = map.copies[i];
    std::copy_n(out + from * c_size, c_size, out + to * c_size);
  }
}

}  // namespace

at::Tensor make_targets(const std::vector<at::Tensor>& layers, int64_t layer_norm,
                        int64_t final_norm, const std::optional<at::Tensor>& mask,
                        const std::optional<at::Tensor>& padding_mask, double eps, int64_t repeat) {
  TORCH_CHECK(!layers.empty(), "make_targets needs at least one layer (K >= 1)");
  TORCH_CHECK(layer_norm >= 0 && layer_norm <= 2 && final_norm >= 0 && final_norm <= 2,
              "make_targets: norms are 0 (none), 1 (instance) or 2 (layer)");
  const at::Tensor& first = layers[0];
  TORCH_CHECK(first.dim() == 3, "make_targets: layers must be [B, T, C], got ", first.sizes());
  const int64_t batch = first.size(0), steps = first.size(1), c_size = first.size(2);
  std::vector<Layer> views;
  for (size_t k = 0; k < layers.size(); ++k) {
    const at::Tensor& l = layers[k];
    TORCH_CHECK(l.is_cpu() && l.sizes() == first.sizes(), "make_targets: layers[", k, "] is ",
                l.sizes(), " on ", l.device(), ", layers[0] is ", first.sizes(), " on cpu");
    TORCH_CHECK(dtype_of(l) != Dtype::kNone, "make_targets: layers[", k,
                "] must be fp32, bf16 or fp16, got ", l.scalar_type());
    TORCH_CHECK(l.stride(2) == 1 || c_size <= 1, "make_targets: layers[", k,
                "] needs a contiguous last dimension");
    views.push_back({static_cast<const char*>(l.const_data_ptr()), dtype_of(l),
                     static_cast<int64_t>(l.element_size()), l.stride(0), l.stride(1)});
  }
  TORCH_CHECK(repeat >= 1 && (mask.has_value() || repeat == 1),
              "make_targets: repeat must be 1, or positive with a mask");
  for (const auto* m : {&mask, &padding_mask}) {
    const int64_t rows = m == &mask ? batch * repeat : batch;
    TORCH_CHECK(!m->has_value() || ((*m)->scalar_type() == at::kBool && (*m)->is_contiguous() &&
                                    (*m)->is_cpu() && (*m)->dim() == 2 && (*m)->size(0) == rows &&
                                    (*m)->size(1) == steps),
                "make_targets: mask and padding_mask must be contiguous bool CPU tensors, "
                "[B*repeat, T] and [B, T]");
  }

  RowMap map = map_rows(batch, steps, mask, padding_mask, repeat);
  at::Tensor out = mask ? at::empty({map.returned, c_size}, first.options().dtype(at::kFloat))
                        : at::empty({batch, steps, c_size}, first.options().dtype(at::kFloat));
  if (map.returned == 0 || c_size == 0) return out;
  float* y = out.mutable_data_ptr<float>();
  // Padded rows that are returned are 0; every other returned row is written below.
  for (int64_t r = 0; r < batch * steps; ++r) {
    if (map.out[r] >= 0 && !map.valid[r]) std::fill_n(y + map.out[r] * c_size, c_size, 0.0f);
  }
  const float e = static_cast<float>(eps);
  if (layer_norm != kInstance && final_norm != kInstance) {
    run_rows(views, map, c_size, layer_norm, final_norm, e, y);
  } else {
    run_tiles(views, map, c_size, layer_norm, final_norm == kLayer ? kNoNorm : final_norm, e, y);
    if (final_norm == kLayer) final_layer_norm(map, c_size, e, y);
  }
  copy_repeats(map, c_size, y);
  return out;
}

}  // namespace d2v
