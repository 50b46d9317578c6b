// Dense CRF mean-field inference on the CPU.
//
// Layout: marginals are point-major (N, Mp), Mp = M rounded up to the vector width,
// so every splat / slice touches whole contiguous label rows; lattice values are
// (V + 1, Mp) with row 0 the all-zero "missing neighbour" row. The points of an image
// are kept in the order the passes visit them (PointOrder: raster order, or vertical
// strips when the op is told the image width).
//
// One mean-field step is one pass over the points: slice the blurred values of every
// kernel, apply the compatibility, add the unary, softmax, and splat the new
// marginals straight into the next step's lattice values. Points are split into
// contiguous chunks ("tasks"), each splatting into its own buffer; the buffers are
// then summed in task order. With one task in raster order the sums are formed in
// pixel order, as pydensecrf forms them; the result depends on the task count and
// the order only through float rounding, never on thread scheduling.
//
// Parallelism: over images when the batch has at least as many images as threads,
// otherwise over pixels, lattice vertices and buffers within each image.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#if defined(__AVX__) || defined(__FMA__)
#include <immintrin.h>
#endif
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "crf/cpu/large_buffer.h"
#include "crf/dense_crf.h"
#include "crf/lattice.h"

namespace wsss_fast {
namespace crf {
namespace {

constexpr int64_t kLanes = 8;             // floats per AVX2 register: label rows are padded to it
constexpr int64_t kPointsPerTask = 4096;  // smallest pixel chunk worth a task of its own
constexpr int64_t kBlockPoints = 32;      // pixels per block of a mean-field pass's phases

int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Eight floats as one value: GCC / Clang vector extensions compile arithmetic on it
// to SIMD instructions whatever the auto-vectoriser decides. Rows are padded to
// whole Lanes; aligned(4) allows loads at any float position.
// (GCC and Clang let a float vector alias floats, so float rows may be read as Lanes.)
typedef float Lanes __attribute__((vector_size(32), aligned(4)));
typedef int32_t IntLanes __attribute__((vector_size(32), aligned(4)));
static_assert(sizeof(Lanes) == kLanes * sizeof(float), "kLanes must match Lanes");

// a * b + c. One fused instruction where the CPU has FMA: the mean-field arithmetic
// then rounds once where pydensecrf rounds twice, an ulp-level difference. (The
// lattice embedding, where rounding decides simplices, never uses it.)
inline Lanes multiply_add(Lanes a, Lanes b, Lanes c) {
#if defined(__FMA__)
  return reinterpret_cast<Lanes>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a),
                                                 reinterpret_cast<__m256>(b),
                                                 reinterpret_cast<__m256>(c)));
#else
  return a * b + c;
#endif
}

// All eight lanes = a (one broadcast instruction; Lanes{} + a would be an addition,
// since 0 + a is not a when a is -0).
inline Lanes broadcast(float a) { return Lanes{a, a, a, a, a, a, a, a}; }

// Max and sum over the eight lanes, broadcast to every lane (three shuffle steps).
inline Lanes all_lanes_max(Lanes v) {
  const IntLanes swaps[3] = {{4, 5, 6, 7, 0, 1, 2, 3}, {2, 3, 0, 1, 6, 7, 4, 5},
                             {1, 0, 3, 2, 5, 4, 7, 6}};
  for (const IntLanes& swap : swaps) {
    const Lanes other = __builtin_shuffle(v, swap);
    v = other > v ? other : v;
  }
  return v;
}

inline Lanes all_lanes_sum(Lanes v) {
  const IntLanes swaps[3] = {{4, 5, 6, 7, 0, 1, 2, 3}, {2, 3, 0, 1, 6, 7, 4, 5},
                             {1, 0, 3, 2, 5, 4, 7, 6}};
  for (const IntLanes& swap : swaps) v += __builtin_shuffle(v, swap);
  return v;
}

// The same for four vectors at once, sharing the shuffles: v[i] becomes its max, or 1
// / its sum (one division for the four), in every lane. 15 operations instead of 24;
// the sums associate as all_lanes_sum's, so they are the same floats.
enum class LaneReduction { kMax, kInverseSum };

template <LaneReduction kReduction>
inline void all_lanes_reduce4(Lanes* v) {
  auto combine = [](Lanes a, Lanes b) {
    if constexpr (kReduction == LaneReduction::kMax) {
      return a > b ? a : b;
    } else {
      return a + b;
    }
  };
  // Lanes i and i + 4 (the halves) of v0 | v1 and of v2 | v3.
  const IntLanes low_halves = {0, 1, 2, 3, 8, 9, 10, 11};
  const IntLanes high_halves = {4, 5, 6, 7, 12, 13, 14, 15};
  const Lanes w01 = combine(__builtin_shuffle(v[0], v[1], low_halves),
                            __builtin_shuffle(v[0], v[1], high_halves));
  const Lanes w23 = combine(__builtin_shuffle(v[2], v[3], low_halves),
                            __builtin_shuffle(v[2], v[3], high_halves));
  // Lanes i and i + 2: rows 0, 2, 1, 3 by pairs of lanes.
  const Lanes pairs = combine(__builtin_shuffle(w01, w23, IntLanes{0, 1, 8, 9, 4, 5, 12, 13}),
                              __builtin_shuffle(w01, w23, IntLanes{2, 3, 10, 11, 6, 7, 14, 15}));
  // Lanes i and i + 1: every lane holds its row's result, rows 0, 0, 2, 2, 1, 1, 3, 3.
  Lanes rows = combine(pairs, __builtin_shuffle(pairs, IntLanes{1, 0, 3, 2, 5, 4, 7, 6}));
  if constexpr (kReduction == LaneReduction::kInverseSum) rows = 1.0f / rows;
  const int lane_of_row[4] = {0, 4, 2, 6};
  for (int i = 0; i < 4; ++i) v[i] = __builtin_shuffle(rows, IntLanes{} + lane_of_row[i]);
}

// exp(x) for x <= 0 (softmax after subtracting the max) to about 1 ulp. Below -87 the
// result would leave the normal range; it is clamped there (< 2e-38 of the largest
// term).
//
// With AVX-512: x = (k + j/16) ln2 + r with |r| <= ln2/32, exp(x) = 2^k 2^(j/16)
// (1 + r + r^2/2 + r^3/6): 2^(j/16) from a 16-entry table in two registers
// (vpermt2ps), the scaling by 2^k one vscalefps. 8 multiplies and FMAs instead of
// Cephes' 10; largest relative error 1.15e-7 on [-87, 0] (Cephes': 1.18e-7). The
// softmax's share of a call (one thread, 500x375, PSA's parameters, minima of 6-25
// calls alternating with Cephes' build): 21 labels 59.4-60.2 -> 51.5-51.8 M TSC
// ticks, 81 labels 191 -> 167 M; the whole call's q25 at 21 labels 98.6-100.3 ->
// 95.8-97.4 ms.
//
// Otherwise Cephes' expf: 2^n P(r) with x = n ln2 + r.
inline Lanes exp_nonpositive(Lanes x) {
  const Lanes lowest = broadcast(-87.0f);
#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__FMA__)
  // max(lowest, x) is x < lowest ? lowest : x, NaN included, in one instruction
  // (GCC compiled the select to a compare and a masked move): the softmax's share of
  // a call at 500x375 with 21 labels fell from 60.3-63.0 M TSC ticks to 58.7-60.8
  // (minima of 20-25 alternating calls).
  x = reinterpret_cast<Lanes>(
      _mm256_max_ps(reinterpret_cast<__m256>(lowest), reinterpret_cast<__m256>(x)));
  static constexpr float kPowers[16] = {
      1.0f,          1.04427373f, 1.09050775f, 1.13878858f, 1.18920708f, 1.24185777f,
      1.29683959f,   1.35425556f, 1.41421354f, 1.47682619f, 1.54221082f, 1.61049032f,
      1.68179286f,   1.75625217f, 1.8340081f,  1.91520655f};  // float(2^(j/16))
  // k = round(16 x / ln2); r = x - k ln2/16 with ln2/16 split so that k times its
  // high part (12 bits) is exact for |k| < 2^11.
  const Lanes k = reinterpret_cast<Lanes>(
      _mm256_roundscale_ps(reinterpret_cast<__m256>(x * 23.0831206542234f),
                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const Lanes r = multiply_add(k, broadcast(-1.99663646e-6f),
                               multiply_add(k, broadcast(-0.0433197021484375f), x));
  // The table lookup reads the low four bits of k, j = k mod 16.
  const Lanes power = reinterpret_cast<Lanes>(_mm256_permutex2var_ps(
      _mm256_loadu_ps(kPowers), _mm256_cvtps_epi32(reinterpret_cast<__m256>(k)),
      _mm256_loadu_ps(kPowers + 8)));
  const Lanes q = multiply_add(multiply_add(broadcast(1.0f / 6.0f), r, broadcast(0.5f)), r,
                               broadcast(1.0f));
  const Lanes y = multiply_add(power * r, q, power);
  // vscalefps multiplies by 2^floor(k / 16).
  return reinterpret_cast<Lanes>(
      _mm256_scalef_ps(reinterpret_cast<__m256>(y), reinterpret_cast<__m256>(k * 0.0625f)));
#else
  x = x < lowest ? lowest : x;
  Lanes p = broadcast(1.9875691500e-4f);
  // Round to nearest by adding and subtracting 1.5 * 2^23.
  const Lanes n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const Lanes r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  p = multiply_add(p, r, broadcast(1.3981999507e-3f));
  p = multiply_add(p, r, broadcast(8.3334519073e-3f));
  p = multiply_add(p, r, broadcast(4.1665795894e-2f));
  p = multiply_add(p, r, broadcast(1.6666665459e-1f));
  p = multiply_add(p, r, broadcast(5.0000001201e-1f));
  p = multiply_add(p, r * r, r + 1.0f);
  const IntLanes bits = (__builtin_convertvector(n, IntLanes) + 127) << 23;
  return p * reinterpret_cast<Lanes>(bits);  // a vector cast reinterprets the bits
#endif
}

inline Lanes* as_lanes(float* data) { return reinterpret_cast<Lanes*>(data); }
inline const Lanes* as_lanes(const float* data) { return reinterpret_cast<const Lanes*>(data); }

// Transposes an 8x8 tile: in[k][j] -> out[j][k] (label planes <-> pixel rows, lanes of
// eight points <-> their rows).
inline void transpose_tile(const Lanes* in, Lanes* out) {
  Lanes low[4], high[4];
  for (int k = 0; k < 4; ++k) {
    low[k] = __builtin_shuffle(in[2 * k], in[2 * k + 1], IntLanes{0, 8, 1, 9, 4, 12, 5, 13});
    high[k] = __builtin_shuffle(in[2 * k], in[2 * k + 1], IntLanes{2, 10, 3, 11, 6, 14, 7, 15});
  }
  const IntLanes even = {0, 1, 8, 9, 4, 5, 12, 13}, odd = {2, 3, 10, 11, 6, 7, 14, 15};
  const Lanes quads[8] = {
      __builtin_shuffle(low[0], low[1], even),   __builtin_shuffle(low[0], low[1], odd),
      __builtin_shuffle(high[0], high[1], even), __builtin_shuffle(high[0], high[1], odd),
      __builtin_shuffle(low[2], low[3], even),   __builtin_shuffle(low[2], low[3], odd),
      __builtin_shuffle(high[2], high[3], even), __builtin_shuffle(high[2], high[3], odd),
  };
  const IntLanes first = {0, 1, 2, 3, 8, 9, 10, 11}, second = {4, 5, 6, 7, 12, 13, 14, 15};
  for (int j = 0; j < 4; ++j) {
    out[j] = __builtin_shuffle(quads[j], quads[j + 4], first);
    out[j + 4] = __builtin_shuffle(quads[j], quads[j + 4], second);
  }
}

// How lattice keys (d ints) map to 64-bit tags. When every coordinate of every key
// the lattice will see (vertices and their blur neighbours) fits a bit field of its
// own, the tag is the key itself, packed: comparing tags compares keys. Otherwise the
// tag is a hash, and equal tags are confirmed on the stored keys.
struct KeyPacking {
  bool exact = false;
  int bits = 0;  // exact tags are below 2^bits
  int64_t low[kMaxFeatureDim] = {};  // coordinate i is stored as key[i] - low[i]
  int shift[kMaxFeatureDim] = {};

  // With exact tags, adding one to coordinate i adds 1 << shift[i] to the tag, with no
  // carry between fields (the packing leaves room for every key the lattice sees), so
  // a simplex's corners and blur neighbours follow from a tag by additions:
  // tag + ones - step_down[i] is the key with every coordinate plus one and coordinate
  // i less d + 1 (step_down[d] = 0: the implicit coordinate d is not in the key).
  uint64_t ones = 0;
  uint64_t step_down[kMaxFeatureDim + 1] = {};

  uint64_t tag(const int32_t* key, int dim) const {
    uint64_t value = 0;
    if (exact) {
      for (int i = 0; i < dim; ++i) value |= static_cast<uint64_t>(key[i] - low[i]) << shift[i];
      return value;
    }
    value = 0x9E3779B97F4A7C15ull;
    for (int i = 0; i < dim; ++i) {
      value = (value ^ static_cast<uint32_t>(key[i])) * 0x100000001B3ull;
    }
    return value ^ (value >> 29);
  }
};

// The packing for points whose remainder-0 points `simplex` (rows of 2 (d+1) ints, the
// first d used) lie within [lowest, highest] per coordinate: a vertex key is within
// d+1 of its point's rem0, a blur neighbour within d of a vertex.
KeyPacking key_packing(const int32_t* lowest, const int32_t* highest, int dim) {
  KeyPacking packing;
  int bits = 0;
  for (int i = 0; i < dim; ++i) {
    packing.low[i] = int64_t{lowest[i]} - 2 * dim - 1;
    const int64_t span = int64_t{highest[i]} + 2 * dim - packing.low[i] + 1;
    packing.shift[i] = bits;
    bits += 64 - __builtin_clzll(static_cast<uint64_t>(span));
  }
  packing.exact = bits <= 64;
  packing.bits = bits;
  for (int i = 0; i < dim && packing.exact; ++i) {
    packing.ones += uint64_t{1} << packing.shift[i];
    packing.step_down[i] = static_cast<uint64_t>(dim + 1) << packing.shift[i];
  }
  return packing;
}

// Map from lattice keys (d ints) to dense vertex ids, for the vertices of `points`
// points. Every vertex's tag is kept; its key only when tags are hashes (exact tags
// are the keys).
//
// When exact tags span few values (below twice the point count: the Gaussian kernel's
// two coordinates at sxy = 3), the map is a plain array indexed by tag: one load per
// lookup, no probing (building the Gaussian lattice at 500x375 went from 5.0 to 4.3 ms).
// Otherwise it is an open-addressing hash table whose slots hold the tag next to the
// id, so that a probe touches one cache line. Exact tags of up to 40 bits with ids
// below 2^24 share one 8-byte word per slot (`words_`; else 16-byte `slots_`): half the
// table, which stays in cache beside the streams of the vertex pass (bilateral lattice
// at 500x375: 12.4 -> 11.7 ms with the table then at a slot per eight points).
class KeyTable {
 public:
  KeyTable(int key_size, const KeyPacking& packing, int64_t points)
      : key_size_(key_size), packing_(packing) {
    if (packing.exact && packing.bits < 31 && (int64_t{1} << packing.bits) <= 2 * points) {
      direct_.assign(size_t{1} << packing.bits, -1);
      return;
    }
    // At most d + 1 vertices per point, and d + 1 for the padding points.
    const int64_t most_vertices = (points + 1) * (key_size + 1);
    in_words_ = packing.exact && packing.bits <= 64 - kIdBits &&
                static_cast<uint64_t>(most_vertices) < kIdMask;
    // Slots for half the points: photos have a vertex for every 10-20 points in the
    // bilateral kernel, and at that load (under 0.1) lookups seldom probe a second
    // slot (one slot per 8 points: bilateral lattice at 500x375 11.2 ms, not 10.0).
    size_t capacity = 1 << 12;
    while (capacity < static_cast<size_t>(points) / 2) capacity *= 2;
    rehash(capacity);
  }

  int32_t size() const { return count_; }
  const int32_t* key(int32_t id) const { return keys_.data() + int64_t{id} * key_size_; }
  uint64_t vertex_tag(int32_t id) const { return tags_[id]; }

  // The key's tag: equal tags mean equal keys when `exact()`.
  uint64_t tag(const int32_t* key) const { return packing_.tag(key, key_size_); }
  bool exact() const { return packing_.exact; }
  bool direct() const { return !direct_.empty(); }
  const KeyPacking& packing() const { return packing_; }

  int32_t find_or_insert(const int32_t* key) { return find_or_insert(key, tag(key)); }

  // `key` may be null when `exact()`: the tag alone is then the key (the null test also
  // keeps GCC from warning about the copy it cannot see is skipped).
  int32_t find_or_insert(const int32_t* key, uint64_t tag) {
    if (!direct_.empty()) {
      int32_t& id = direct_[tag];
      if (id < 0) {
        tags_.push_back(tag);
        id = count_++;
      }
      return id;
    }
    if (2 * (count_ + 1) > static_cast<int64_t>(mask_ + 1)) rehash(2 * (mask_ + 1));
    size_t slot = index(tag);
    if (in_words_) {
      while (true) {
        uint64_t& word = words_[slot];
        if (word == kEmptyWord) {
          tags_.push_back(tag);
          word = tag << kIdBits | static_cast<uint64_t>(count_);
          return count_++;
        }
        if (word >> kIdBits == tag) return static_cast<int32_t>(word & kIdMask);
        slot = (slot + 1) & mask_;
      }
    }
    while (true) {
      Slot& entry = slots_[slot];
      if (entry.id < 0) {
        if (!packing_.exact && key != nullptr) keys_.insert(keys_.end(), key, key + key_size_);
        tags_.push_back(tag);
        entry = {tag, count_};
        return count_++;
      }
      if (entry.tag == tag && (packing_.exact || same_key(key, this->key(entry.id)))) {
        return entry.id;
      }
      slot = (slot + 1) & mask_;
    }
  }

  // A lookup of `tag` in the slot its probe starts at only, without branches: the id
  // there, or -1 when the slot is empty (then the key is not in the table). Sets
  // `settled` false when the slot holds another key, or a key that needs comparing:
  // the probe goes on in find or find_or_insert. Lookups that mostly settle at their
  // first slot, but by no predictable rule between found and missing, cost no
  // mispredicted branch this way.
  int32_t find_in_first_slot(uint64_t tag, bool& settled) const {
    if (!direct_.empty()) {
      settled = true;
      return direct_[tag];
    }
    if (in_words_) {
      const uint64_t word = words_[index(tag)];
      const bool empty = word == kEmptyWord;
      const bool match = !empty && word >> kIdBits == tag;
      settled = empty | match;
      return match ? static_cast<int32_t>(word & kIdMask) : -1;
    }
    const Slot& entry = slots_[index(tag)];
    const bool empty = entry.id < 0;
    const bool match = !empty && packing_.exact && entry.tag == tag;
    settled = empty | match;
    return match ? entry.id : -1;
  }

  // Starts loading the slot a probe for `tag` begins at: lookups of large lattices
  // miss the caches, and a batch of prefetches overlaps those misses.
  void prefetch(uint64_t tag) const {
    if (!direct_.empty()) {
      __builtin_prefetch(direct_.data() + tag);
    } else if (in_words_) {
      __builtin_prefetch(words_.data() + index(tag));
    } else {
      __builtin_prefetch(slots_.data() + index(tag));
    }
  }

  // Returns -1 when the key is not a vertex. Read-only: safe from many threads. `key`
  // may be null when `exact()`.
  int32_t find(const int32_t* key, uint64_t tag) const {
    if (!direct_.empty()) return direct_[tag];
    size_t slot = index(tag);
    if (in_words_) {
      while (true) {
        const uint64_t word = words_[slot];
        if (word == kEmptyWord) return -1;
        if (word >> kIdBits == tag) return static_cast<int32_t>(word & kIdMask);
        slot = (slot + 1) & mask_;
      }
    }
    while (true) {
      const Slot& entry = slots_[slot];
      if (entry.id < 0) return -1;
      if (entry.tag == tag && (packing_.exact || same_key(key, this->key(entry.id)))) {
        return entry.id;
      }
      slot = (slot + 1) & mask_;
    }
  }

 private:
  struct Slot {
    uint64_t tag;
    int32_t id;
  };
  static constexpr int kIdBits = 24;
  static constexpr uint64_t kIdMask = (uint64_t{1} << kIdBits) - 1;
  static constexpr uint64_t kEmptyWord = ~uint64_t{0};  // no word of a real entry: ids < kIdMask

  // A plain loop: keys are a few ints, where std::equal would call memcmp.
  bool same_key(const int32_t* a, const int32_t* b) const {
    for (int i = 0; i < key_size_; ++i) {
      if (a[i] != b[i]) return false;
    }
    return true;
  }

  // The top bits of the tag mixed by two multiplications and an xor-shift (splitmix64's
  // constants): packed tags are far from uniform in their low bits, and multiplying by
  // 2^64 / phi alone left the bilateral lattice's lookups at 1.6 probes on average
  // (1.2 with the mixing) at a load of 0.38; building that lattice went from 14.3 to
  // 12.6 ms (500x375).
  size_t index(uint64_t tag) const {
    uint64_t mixed = tag * 0x9E3779B97F4A7C15ull;
    mixed ^= mixed >> 29;
    return static_cast<size_t>((mixed * 0xBF58476D1CE4E5B9ull) >> index_shift_);
  }

  void rehash(size_t capacity) {
    mask_ = capacity - 1;
    index_shift_ = __builtin_clzll(static_cast<uint64_t>(capacity)) + 1;
    if (in_words_) {
      words_.assign(capacity, kEmptyWord);
      for (int32_t id = 0; id < count_; ++id) {
        size_t slot = index(tags_[id]);
        while (words_[slot] != kEmptyWord) slot = (slot + 1) & mask_;
        words_[slot] = tags_[id] << kIdBits | static_cast<uint64_t>(id);
      }
      return;
    }
    slots_.assign(capacity, Slot{0, -1});
    for (int32_t id = 0; id < count_; ++id) {
      size_t slot = index(tags_[id]);
      while (slots_[slot].id >= 0) slot = (slot + 1) & mask_;
      slots_[slot] = {tags_[id], id};
    }
  }

  int key_size_;
  KeyPacking packing_;
  int32_t count_ = 0;
  size_t mask_ = 0;
  int index_shift_ = 0;
  LargeBuffer<int32_t> keys_;
  LargeBuffer<uint64_t> tags_;
  bool in_words_ = false;
  LargeBuffer<uint64_t> words_;
  LargeBuffer<Slot> slots_;
  LargeBuffer<int32_t> direct_;  // id by exact tag, -1 for none; empty: hash table
};

// A lattice built for one set of points: where each point splats, and the blur graph.
struct Lattice {
  int dim = 0;                       // feature dimension d
  int64_t num_points = 0;            // N
  int64_t num_vertices = 0;          // V
  LargeBuffer<int32_t> vertex;       // (N, d+1) enclosing vertex ids + 1
  LargeBuffer<uint16_t> narrow_vertex;  // the same as uint16 when they fit (V < 65535)
  LargeBuffer<float> weight;         // (N, d+1) barycentric weights
  LargeBuffer<int32_t> neighbours;   // (d+1, V, 2) blur neighbour ids + 1, 0 when missing
  int64_t neighbour_span = 0;        // largest |neighbour id - vertex id|
};

// Splits [0, count) into `tasks` contiguous chunks and runs body(task, begin, end).
template <typename Body>
void for_each_task(int64_t count, int64_t tasks, const Body& body) {
  auto run = [&](int64_t task) {
    const int64_t begin = count * task / tasks;
    const int64_t end = count * (task + 1) / tasks;
    body(task, begin, end);
  };
  if (tasks == 1) {
    run(0);
    return;
  }
  at::parallel_for(0, tasks, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) run(task);
  });
}

int64_t task_count(int64_t work, int64_t threads) {
  return std::max<int64_t>(1, std::min<int64_t>(threads, work / kPointsPerTask));
}

// The order the points of an image are visited in: the order of the per-point arrays
// (simplices, weights, -unary and q rows) and so of the splats that add up in each
// lattice row. Reading the inputs and writing the marginals translate; the rest works
// in this order.
//
// Points that are the pixels of an image `width` wide, in raster order, go in vertical
// strips of kStripColumns columns, each strip top to bottom. In raster order a row of
// pixels crosses every colour region of the image, and the bilateral kernel's lattice
// rows it touches no longer fit the caches by the time the next row comes back to
// them; a strip touches fewer. At 500x375 with 21 labels (one thread, PSA's
// parameters, lattices and 10 steps) the op took 93.9 ms instead of 99.0 by the lower
// quartile of 12 alternating rounds (strips of 48: 94.5, 96: 95.8, 128: 97.0; tiles of
// 32x32 to 64x64 measured like strips of 64). Vertex ids follow the points' order:
// ids in pixel order cost more than the strips saved. The sums are formed in another
// order than pydensecrf's: on the test photos the largest difference to pydensecrf2's
// marginals grew from 5.5e-6 to 1.4e-5 (the limit is 1e-4), the argmax still the
// same everywhere. A lattice with a vertex for about every pixel (a Gaussian kernel
// at sxy = 1) gets neighbours a strip apart in id, too far for the blur's wavefront:
// callers ask for strips only where that cannot happen (STRIP_ORDER_MIN_SXY in
// wsss_fast/ops/dense_crf.py).
class PointOrder {
 public:
  static constexpr int64_t kStripColumns = 64;

  // `width` 0, or one strip's worth or less: the points in their own order.
  PointOrder(int64_t points, int64_t width) {
    if (width > kStripColumns && points % width == 0) {
      width_ = width;
      strip_points_ = kStripColumns * (points / width);
    }
  }

  // Calls body(point, pixel, count) for the runs of pixels [begin, end) that are
  // consecutive points too: pixels pixel .. pixel + count - 1 are points point .. point
  // + count - 1. In pixel order.
  template <typename Body>
  void for_each_run(int64_t begin, int64_t end, const Body& body) const {
    for_each_run_in<false>(begin, end, body);
  }

  // The same runs for points [begin, end), in point order.
  template <typename Body>
  void for_each_run_by_point(int64_t begin, int64_t end, const Body& body) const {
    for_each_run_in<true>(begin, end, body);
  }

  // The image width when the points are visited in strips, else 0.
  int64_t strip_image_width() const { return strip_points_ == 0 ? 0 : width_; }

 private:
  // The runs of [begin, end), points when kByPoint, else pixels, in that order.
  template <bool kByPoint, typename Body>
  void for_each_run_in(int64_t begin, int64_t end, const Body& body) const {
    if (strip_points_ == 0) {
      if (end > begin) body(begin, begin, end - begin);
      return;
    }
    for (int64_t at = begin; at < end;) {
      // Where `at` lies: its strip, its row, and its column within the strip.
      int64_t strip, row, column;
      if constexpr (kByPoint) {
        strip = at / strip_points_;
        const int64_t in_strip = at - strip * strip_points_;
        row = in_strip / strip_columns(strip);
        column = in_strip % strip_columns(strip);
      } else {
        row = at / width_;
        strip = at % width_ / kStripColumns;
        column = at % width_ - strip * kStripColumns;
      }
      const int64_t columns = strip_columns(strip);
      const int64_t count = std::min(columns - column, end - at);
      body(strip * strip_points_ + row * columns + column,
           row * width_ + strip * kStripColumns + column, count);
      at += count;
    }
  }

  // Strip `strip`'s width: kStripColumns, less for the last one.
  int64_t strip_columns(int64_t strip) const {
    return std::min(kStripColumns, width_ - strip * kStripColumns);
  }

  int64_t width_ = 0;
  int64_t strip_points_ = 0;  // points of a full strip; 0: the identity
};

// 1 when x is NaN or infinite (all exponent bits set), else 0. Integer bit tests, so
// that loops OR-ing them up vectorise and carry no floating-point dependency chain.
inline uint32_t not_finite(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return (bits & 0x7f800000u) == 0x7f800000u;
}

// The same test on eight floats: -1 in the lanes that are NaN or infinite, else 0.
inline IntLanes not_finite(Lanes x) {
  const IntLanes exponent = IntLanes{} + 0x7f800000;
  return (reinterpret_cast<IntLanes>(x) & exponent) == exponent;
}

// Whether data[0, count) are all finite; copies them into `copy` on the way when it
// is given (one pass for both).
bool all_finite(const float* data, int64_t count, int64_t threads, float* copy = nullptr) {
  const int64_t tasks = task_count(count, threads);
  std::vector<uint32_t> bad(tasks, 0);
  for_each_task(count, tasks, [&](int64_t task, int64_t begin, int64_t end) {
    uint32_t found = 0;
    if (copy != nullptr) {
      for (int64_t i = begin; i < end; ++i) {
        const float value = data[i];
        found |= not_finite(value);
        copy[i] = value;
      }
    } else {
      for (int64_t i = begin; i < end; ++i) found |= not_finite(data[i]);
    }
    bad[task] = found;
  });
  return std::all_of(bad.begin(), bad.end(), [](uint32_t found) { return found == 0; });
}

#if defined(__AVX__)
// embed_point for eight points at once, lanes = points p..p+7 (their features in
// columns column..column+7), with the same float operations in the same order (no
// FMA: -ffp-contract=off), so every lane gives the scalar function's result bit for
// bit. Data-dependent indexing (the barycentric scatter by rank) becomes a
// compare-and-select over the d+2 slots.
template <int kDim>
void embed_eight_points(const float* features, int64_t stride, const float* scale, int64_t p,
                        int64_t column, int32_t* simplex, float* weight) {
  constexpr int d = kDim;
  constexpr int corners = d + 1;
  const Lanes down = broadcast(1.0f / static_cast<float>(d + 1));
  const Lanes up = broadcast(static_cast<float>(d + 1));
  Lanes elevated[corners], rem0[corners];
  IntLanes rank[corners];

  Lanes running = Lanes{};
  for (int j = d; j > 0; --j) {
    const Lanes cf = *as_lanes(features + (j - 1) * stride + column) * scale[j - 1];
    elevated[j] = running - static_cast<float>(j) * cf;
    running += cf;
  }
  elevated[0] = running;

  Lanes sum = Lanes{};
  for (int i = 0; i <= d; ++i) {
    const Lanes scaled = down * elevated[i];
    const Lanes v = reinterpret_cast<Lanes>(_mm256_round_ps(
        reinterpret_cast<__m256>(scaled), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    rem0[i] = v * up;
    sum += v;
    rank[i] = IntLanes{};
  }
  Lanes residual[corners];
  for (int i = 0; i <= d; ++i) residual[i] = elevated[i] - rem0[i];
  for (int i = 0; i < d; ++i) {
    for (int j = i + 1; j <= d; ++j) {
      const IntLanes i_below = residual[i] < residual[j];  // -1 where true, else 0
      rank[i] -= i_below;
      rank[j] += 1 + i_below;
    }
  }
  const IntLanes shift = __builtin_convertvector(sum, IntLanes);
  const IntLanes zero = IntLanes{}, top = zero + d;
  for (int i = 0; i <= d; ++i) {
    rank[i] += shift;
    const IntLanes below = rank[i] < zero, above = rank[i] > top;
    rank[i] += (below & (d + 1)) - (above & (d + 1));
    rem0[i] += reinterpret_cast<Lanes>(reinterpret_cast<IntLanes>(up) & below);
    rem0[i] -= reinterpret_cast<Lanes>(reinterpret_cast<IntLanes>(up) & above);
  }
  // bary[d - rank_i] += v_i; bary[d - rank_i + 1] -= v_i, for i in order.
  Lanes bary[d + 2];
  for (int k = 0; k <= d + 1; ++k) bary[k] = Lanes{};
  for (int i = 0; i <= d; ++i) {
    const Lanes v = (elevated[i] - rem0[i]) * down;
    const IntLanes slot = top - rank[i];
    for (int k = 0; k <= d + 1; ++k) {
      const Lanes plus = reinterpret_cast<Lanes>(reinterpret_cast<IntLanes>(v) & (slot == k));
      const Lanes minus =
          reinterpret_cast<Lanes>(reinterpret_cast<IntLanes>(v) & (slot + 1 == k));
      bary[k] = bary[k] + plus - minus;
    }
  }
  bary[0] += 1.0f + bary[d + 1];

  // Back to one row per point. With AVX-512, 8x8 register transposes of the d+1
  // vectors, then masked stores of each row's d+1 lanes: the bilateral lattice at
  // 500x375 took 10.8 ms instead of 11.6 (AVX2's masked stores are slow on AMD:
  // slower than the lane-by-lane copy).
  IntLanes rem0_int[corners];
  for (int i = 0; i <= d; ++i) rem0_int[i] = __builtin_convertvector(rem0[i], IntLanes);
#if defined(__AVX512F__) && defined(__AVX512VL__)
  const __mmask8 used = static_cast<__mmask8>((1u << corners) - 1);
  auto store_rows = [&](const auto* columns, auto* first_row, int64_t row_stride) {
    Lanes tile[kLanes], rows[kLanes];
    for (int i = 0; i < kLanes; ++i) {
      tile[i] = i < corners ? reinterpret_cast<Lanes>(columns[i]) : Lanes{};
    }
    transpose_tile(tile, rows);
    for (int lane = 0; lane < kLanes; ++lane) {  // bits as they are, ints or floats
      _mm256_mask_storeu_epi32(first_row + lane * row_stride, used,
                               reinterpret_cast<__m256i>(rows[lane]));
    }
  };
  int32_t* simplex_rows = simplex + p * 2 * corners;
  store_rows(rem0_int, simplex_rows, 2 * corners);
  store_rows(rank, simplex_rows + corners, 2 * corners);
  store_rows(bary, weight + p * corners, corners);
#else
  for (int i = 0; i <= d; ++i) {
    for (int lane = 0; lane < 8; ++lane) {
      int32_t* row = simplex + (p + lane) * 2 * corners;
      row[i] = rem0_int[i][lane];
      row[corners + i] = rank[i][lane];
      weight[(p + lane) * corners + i] = bary[i][lane];
    }
  }
#endif
}
#endif

// Calls body(std::integral_constant<int, d>) for the feature dimensions with code of
// their own, 2 and 5 (the Gaussian and bilateral kernels), else body with 0 (d read
// at run time).
template <typename Body>
inline void dispatch_feature_dim(int dim, const Body& body) {
  switch (dim) {
    case 2:
      body(std::integral_constant<int, 2>{});
      break;
    case 5:
      body(std::integral_constant<int, 5>{});
      break;
    default:
      body(std::integral_constant<int, 0>{});
  }
}

// Per coordinate, the smallest and largest remainder-0 coordinates seen (both start
// at 0: the origin is among them for pydensecrf's padding points).
struct Rem0Bounds {
  int32_t lowest[kMaxFeatureDim] = {};
  int32_t highest[kMaxFeatureDim] = {};
};

// Embeds points [begin, end), whose features are columns `column` onwards of the
// (d, N) `features` at row stride `stride`: their simplex (rem0 then rank, 2 (d+1)
// ints each) and barycentric weights (d+1 each). Widens `bounds` to their rem0s on
// the way, while the rows are in L1 (a separate pass over the simplices: Gaussian
// lattice at 500x375 3.8 ms instead of 3.5; the bilateral measured alike either way).
template <int kDim>
void embed_points(const float* features, int64_t stride, int dim, const float* scale,
                  int64_t begin, int64_t end, int64_t column, int32_t* simplex, float* weight,
                  Rem0Bounds& bounds) {
  const int corners = dim + 1;
  const int64_t shift = column - begin;  // point p's features are column p + shift
  int64_t p = begin;
#if defined(__AVX__)
  if constexpr (kDim > 0 && kDim < 8) {  // d + 1 lanes per point row
    // Lane i of a point's row is its rem0 coordinate i for i < d; a masked load zeroes
    // the rest, harmless as the bounds include 0.
    IntLanes in_rem0;
    for (int i = 0; i < 8; ++i) in_rem0[i] = i < kDim ? -1 : 0;
    IntLanes lowest = IntLanes{}, highest = IntLanes{};
    for (; p + 8 <= end; p += 8) {
      embed_eight_points<kDim>(features, stride, scale, p, p + shift, simplex, weight);
      for (int lane = 0; lane < 8; ++lane) {
        const IntLanes rem0 = reinterpret_cast<IntLanes>(_mm256_maskload_ps(
            reinterpret_cast<const float*>(simplex + (p + lane) * 2 * corners),
            reinterpret_cast<__m256i>(in_rem0)));
        lowest = rem0 < lowest ? rem0 : lowest;
        highest = rem0 > highest ? rem0 : highest;
      }
    }
    for (int i = 0; i < kDim; ++i) {
      bounds.lowest[i] = std::min(bounds.lowest[i], lowest[i]);
      bounds.highest[i] = std::max(bounds.highest[i], highest[i]);
    }
  }
#endif
  for (; p < end; ++p) {
    int32_t* rem0 = simplex + p * 2 * corners;
    embed_point<kDim>(features + (p + shift), stride, dim, scale, rem0, rem0 + corners,
                      weight + p * corners);
    for (int i = 0; i < dim; ++i) {
      bounds.lowest[i] = std::min(bounds.lowest[i], rem0[i]);
      bounds.highest[i] = std::max(bounds.highest[i], rem0[i]);
    }
  }
}

// Vertex ids + 1 of every point's d+1 corners, ids in order of first appearance, for
// exact tags. A point's corner tags follow from its rem0's tag by units: corner r + 1
// is corner r plus one in every coordinate, less d + 1 in the coordinate of rank
// d - r.
//
// A direct table's lookup is one load: every corner is looked up, with one branch per
// point (is any corner new?), the same way each point. In a hash table a lookup costs
// more, and a corner whose tag is the previous point's same corner (3/5 of the
// bilateral kernel's on photos) takes that id instead. How many corners change varies
// from point to point, though, and a loop over them per point mispredicted its exit
// about once a point. So the points go in chunks: each changed corner's tag is
// appended to a list (unchanged corners write 0), the list is looked up in one loop,
// and then each 0 takes the id of the point before. Lookups stay in point and corner
// order, so the ids are the same. Preparing the kernels at 500x375 took 4.0-4.2 ms
// instead of 4.5-4.6 (Gaussian) and 10.2-10.6 instead of 11.0-11.5 (bilateral), by
// minima of 10-12 rounds. (Prefetching slots a batch of points ahead was slower.)
template <int kDim>
void assign_vertices_exact(const int32_t* simplex, int runtime_dim, int64_t num_points,
                           KeyTable& table, int32_t* vertex) {
  const int dim = kDim > 0 ? kDim : runtime_dim;
  const int corners = dim + 1;
  // A local copy: the loops' stores could alias the table's, which would reload it
  // (preparing the kernels at 500x375: Gaussian 4.09 -> 3.97 ms, bilateral 9.93 ->
  // 9.54, minima of 14 rounds).
  const KeyPacking packing = table.packing();
  uint64_t tag[kMaxFeatureDim + 1];
  auto corner_tags = [&](int64_t p) {  // point p's, into `tag`
    const int32_t* rem0 = simplex + p * 2 * corners;
    const int32_t* rank = rem0 + corners;
    int coordinate_of_rank[kMaxFeatureDim + 1];
    for (int c = 0; c <= dim; ++c) coordinate_of_rank[rank[c]] = c;
    tag[0] = packing.tag(rem0, dim);
    for (int r = 0; r < dim; ++r) {
      tag[r + 1] = tag[r] + packing.ones - packing.step_down[coordinate_of_rank[dim - r]];
    }
  };

  if (table.direct()) {
    for (int64_t p = 0; p < num_points; ++p) {
      corner_tags(p);
      int32_t* ids = vertex + p * corners;
      bool known = true;
      for (int r = 0; r <= dim; ++r) {
        bool settled;
        const int32_t id = table.find_in_first_slot(tag[r], settled);
        known &= id >= 0;
        ids[r] = id + 1;
      }
      if (known) continue;
      for (int r = 0; r <= dim; ++r) ids[r] = table.find_or_insert(nullptr, tag[r]) + 1;
    }
    return;
  }

  constexpr int64_t kChunkPoints = 256;
  uint64_t list_tags[kChunkPoints * (kMaxFeatureDim + 1)];
  int32_t list_at[kChunkPoints * (kMaxFeatureDim + 1)];  // where the id goes in the chunk
  uint64_t previous[kMaxFeatureDim + 1] = {};  // GCC cannot see that point 0 lists all
  for (int64_t first = 0; first < num_points; first += kChunkPoints) {
    const int64_t count = std::min(kChunkPoints, num_points - first);
    int32_t* chunk_ids = vertex + first * corners;
    int64_t listed = 0;
    for (int64_t i = 0; i < count; ++i) {
      corner_tags(first + i);
      for (int r = 0; r <= dim; ++r) {
        const bool changed = first + i == 0 || tag[r] != previous[r];
        const int32_t at = static_cast<int32_t>(i * corners + r);
        list_tags[listed] = tag[r];
        list_at[listed] = at;
        listed += changed;
        chunk_ids[at] = 0;
        previous[r] = tag[r];
      }
    }
    for (int64_t n = 0; n < listed; ++n) {
      bool settled;
      int32_t id = table.find_in_first_slot(list_tags[n], settled);
      if (!settled || id < 0) id = table.find_or_insert(nullptr, list_tags[n]);
      chunk_ids[list_at[n]] = id + 1;
    }
    // The chunk's first point copies from the previous chunk's last (the very first
    // point has every corner listed).
    int32_t last[kMaxFeatureDim + 1] = {};
    if (first > 0) std::copy(chunk_ids - corners, chunk_ids, last);
    for (int64_t i = 0; i < count; ++i) {
      for (int r = 0; r <= dim; ++r) {
        const int32_t own = chunk_ids[i * corners + r];
        last[r] = own != 0 ? own : last[r];
        chunk_ids[i * corners + r] = last[r];
      }
    }
  }
}

// The same for hashed tags, from the keys: a point in the previous point's simplex
// copies its ids.
void assign_vertices_hashed(const int32_t* simplex, int dim, int64_t num_points,
                            KeyTable& table, int32_t* vertex) {
  const int corners = dim + 1;
  int32_t key[kMaxFeatureDim];
  for (int64_t p = 0; p < num_points; ++p) {
    const int32_t* rem0 = simplex + p * 2 * corners;
    int32_t* ids = vertex + p * corners;
    bool same_simplex = p > 0;
    for (int i = 0; i < 2 * corners && same_simplex; ++i) {
      same_simplex = rem0[i] == rem0[i - 2 * corners];
    }
    if (same_simplex) {
      std::copy(ids - corners, ids, ids);
      continue;
    }
    const int32_t* rank = rem0 + corners;
    for (int r = 0; r <= dim; ++r) {
      for (int i = 0; i < dim; ++i) key[i] = vertex_key(rem0, rank, dim, r, i);
      ids[r] = table.find_or_insert(key) + 1;
    }
  }
}

// features: (d, N) at row stride `stride`, all finite (the embedding converts them to
// integers); the lattice's points are in `order`.
Lattice build_lattice(const float* features, int64_t stride, int dim, int64_t num_points,
                      const PointOrder& order, int64_t threads) {
  Lattice lattice;
  lattice.dim = dim;
  lattice.num_points = num_points;
  const int corners = dim + 1;
  lattice.vertex.resize(num_points * corners);
  lattice.weight.resize(num_points * corners);
  float scale[kMaxFeatureDim];
  lattice_scale_factors(dim, scale);

  // Embed every point (the arithmetic-heavy part, parallel): its simplex
  // (remainder-0 point and ranks) and barycentric weights, and the bounds of the rem0s,
  // which set the tag packing.
  LargeBuffer<int32_t> simplex(num_points * 2 * corners);
  const int64_t embed_tasks = task_count(num_points, threads);
  std::vector<Rem0Bounds> task_bounds(embed_tasks);
  for_each_task(num_points, embed_tasks, [&](int64_t task, int64_t begin, int64_t end) {
    int32_t* simplices = simplex.data();
    float* weights = lattice.weight.data();
    Rem0Bounds& bounds = task_bounds[task];
    order.for_each_run(begin, end, [&](int64_t point, int64_t pixel, int64_t count) {
      dispatch_feature_dim(dim, [&](auto fixed) {
        embed_points<decltype(fixed)::value>(features, stride, dim, scale, point, point + count,
                                             pixel, simplices, weights, bounds);
      });
    });
  });
  Rem0Bounds bounds;
  for (const Rem0Bounds& part : task_bounds) {
    for (int i = 0; i < dim; ++i) {
      bounds.lowest[i] = std::min(bounds.lowest[i], part.lowest[i]);
      bounds.highest[i] = std::max(bounds.highest[i], part.highest[i]);
    }
  }
  KeyTable table(dim, key_packing(bounds.lowest, bounds.highest, dim), num_points);
  if (table.exact()) {
    // Fixed sizes keep a point's tags in registers: the Gaussian lattice at 500x375
    // went from 4.3 to 3.7 ms, the bilateral from 12.9 to 12.3.
    dispatch_feature_dim(dim, [&](auto fixed) {
      assign_vertices_exact<decltype(fixed)::value>(simplex.data(), dim, num_points, table,
                                                    lattice.vertex.data());
    });
  } else {
    assign_vertices_hashed(simplex.data(), dim, num_points, table, lattice.vertex.data());
  }
  // pydensecrf embeds points four at a time and fills the last block with points at
  // the origin. Their vertices splat nothing but join the blur graph, so they change
  // the result whenever N % 4 != 0: add them too. The origin has rem0 = 0 and
  // rank_i = i.
  if (num_points % 4 != 0) {
    int32_t origin_rem0[kMaxFeatureDim + 1] = {};
    int32_t origin_rank[kMaxFeatureDim + 1];
    for (int i = 0; i <= dim; ++i) origin_rank[i] = i;
    int32_t key[kMaxFeatureDim];
    for (int r = 0; r <= dim; ++r) {
      for (int i = 0; i < dim; ++i) key[i] = vertex_key(origin_rem0, origin_rank, dim, r, i);
      table.find_or_insert(key);
    }
  }
  LargeBuffer<int32_t>().swap(simplex);  // release it before the neighbour tables
  const int64_t vertices = table.size();
  lattice.num_vertices = vertices;

  // Blur neighbours along each of the d+1 lattice axes (parallel, read-only table),
  // in batches of vertices: all their neighbours' tags first, slots prefetched, then
  // the lookups. With exact tags a neighbour's tag is the vertex's plus or minus units.
  // Neighbourhood is symmetric (u is v's second neighbour along an axis exactly when
  // v is u's first), so only the second ones are looked up, and each found u gets v
  // as its first: half the lookups, which miss the caches in large lattices
  // (preparing the kernels at 500x375: bilateral 11.0 -> 10.2 ms, Gaussian 4.3 -> 4.2,
  // minima of 12 rounds). Every first-neighbour slot is written by at most one
  // vertex, so the tasks never write the same slot. Each task also finds the largest
  // |neighbour id - vertex id| among its vertices, for the blur's wavefront.
  constexpr int64_t kBatch = 32;
  lattice.neighbours.assign(corners * vertices * 2, 0);  // 0: no neighbour
  const int64_t neighbour_tasks = task_count(vertices, threads);
  std::vector<int64_t> task_span(neighbour_tasks, 0);
  for_each_task(vertices, neighbour_tasks, [&](int64_t task, int64_t begin, int64_t end) {
    int64_t span = 0;
    int32_t neighbour[kMaxFeatureDim + 1];
    uint64_t tags[kBatch][kMaxFeatureDim + 1];
    // The key of vertex v's second neighbour along `axis`, into `neighbour`.
    auto neighbour_key = [&](int64_t v, int axis) {
      const int32_t* key = table.key(static_cast<int32_t>(v));
      for (int i = 0; i < dim; ++i) neighbour[i] = key[i] + 1;
      // Axis d is the implicit last coordinate: there every stored one moves.
      if (axis < dim) neighbour[axis] = key[axis] - dim;
    };
    for (int64_t first = begin; first < end; first += kBatch) {
      const int64_t last = std::min(end, first + kBatch);
      for (int64_t v = first; v < last; ++v) {
        const uint64_t tag = table.vertex_tag(static_cast<int32_t>(v));
        for (int axis = 0; axis <= dim; ++axis) {
          uint64_t& out = tags[v - first][axis];
          if (table.exact()) {
            out = tag + table.packing().ones - table.packing().step_down[axis];
          } else {
            neighbour_key(v, axis);
            out = table.tag(neighbour);
          }
          table.prefetch(out);
        }
      }
      for (int64_t v = first; v < last; ++v) {
        for (int axis = 0; axis <= dim; ++axis) {
          if (!table.exact()) neighbour_key(v, axis);
          int32_t* pairs = lattice.neighbours.data() + axis * vertices * 2;
          const int32_t id = table.find(table.exact() ? nullptr : neighbour, tags[v - first][axis]);
          pairs[2 * v + 1] = id + 1;
          if (id >= 0) {
            pairs[2 * int64_t{id}] = static_cast<int32_t>(v + 1);
            span = std::max<int64_t>(span, std::abs(int64_t{id} - v));
          }
        }
      }
    }
    task_span[task] = span;
  });
  lattice.neighbour_span = *std::max_element(task_span.begin(), task_span.end());
  return lattice;
}

// One axis of the blur for vertices [begin, end): out(v) = in(v) + (in(n1) + in(n2)) / 2
// with n1, n2 the vertex's neighbours along `axis`. `in(id)` gives the row of id + 1
// (row 0: a missing neighbour, all zero), `out(v)` the row to write for vertex v.
// pydensecrf blurs in double for at most two channels, in float otherwise
// (`sequential_rounding`); the double loop runs over the `used` channels only (the
// labels: the padding channels are zero everywhere and stay so).
template <typename InRow, typename OutRow>
void blur_vertices(const Lattice& lattice, int axis, int64_t channels, int64_t used,
                   bool sequential_rounding, const InRow& in, const OutRow& out_row,
                   int64_t begin, int64_t end) {
  const int32_t* pairs = lattice.neighbours.data() + axis * lattice.num_vertices * 2;
  const Lanes half = broadcast(0.5f);
  for (int64_t v = begin; v < end; ++v) {
    const float* self = in(v + 1);
    const float* first = in(pairs[2 * v]);
    const float* second = in(pairs[2 * v + 1]);
    float* out = out_row(v);
    if (sequential_rounding) {
      for (int64_t c = 0; c < used; ++c) {
        out[c] = static_cast<float>(self[c] + 0.5 * (first[c] + second[c]));
      }
    } else {
      for (int64_t j = 0; j < channels / kLanes; ++j) {
        as_lanes(out)[j] =
            multiply_add(half, as_lanes(first)[j] + as_lanes(second)[j], as_lanes(self)[j]);
      }
    }
  }
}

// Smallest chunk of the blur's wavefront, in vertices, and the smallest buffer worth a
// wavefront (below it the plain passes run in L2 anyway).
constexpr int64_t kMinBlurChunk = 256;
constexpr int64_t kMinWavefrontBytes = int64_t{1} << 21;

// One blur pass per axis over `values` ((V + 1) rows of `channels` floats, the first
// `used` of them data, row 0 zero); `scratch` is a second such buffer. Returns the one
// holding the result.
//
// Axis j reads the output of axis j - 1 at a vertex and its two neighbours. Plainly
// that is one pass over every vertex per axis, alternating the two buffers: a lattice
// of megabytes (the Gaussian kernel at sxy = 1 has a vertex for about every pixel)
// then streams through memory d + 1 times. When no neighbour is further than a chunk
// of vertices away in id (ids follow the pixels, and so do grid neighbours), one
// thread instead runs the axes as a wavefront over chunks, axis j one chunk behind
// axis j - 1: the first axis reads `values`, the intermediate axes write rings of
// four chunks that stay in cache (a ring holds the three chunks the next axis reads),
// and the last axis writes back into `values`, d chunks behind the first axis, into
// chunks the first axis has read for the last time. Every vertex gets the same
// arithmetic as in the plain passes.
float* blur(const Lattice& lattice, float* values, float* scratch, int64_t channels,
            int64_t used, bool sequential_rounding, int64_t threads) {
  const int64_t vertices = lattice.num_vertices;
  const int axes = lattice.dim + 1;
  int64_t chunk = kMinBlurChunk;
  while (chunk < lattice.neighbour_span) chunk *= 2;
  const int64_t bytes = (vertices + 1) * channels * static_cast<int64_t>(sizeof(float));
  if (threads == 1 && axes >= 2 && vertices > 8 * chunk && bytes >= kMinWavefrontBytes) {
    const int64_t ring = 4 * chunk;  // rows per ring; a power of two
    LargeBuffer<float> rings((axes - 1) * ring * channels + channels, 0.0f);
    const float* zero_row = rings.data() + (axes - 1) * ring * channels;
    auto ring_in = [&](int a) {  // rows of axis a's output, a < axes - 1
      const float* base = rings.data() + a * ring * channels;
      return [=](int64_t id) {
        return id == 0 ? zero_row : base + ((id - 1) & (ring - 1)) * channels;
      };
    };
    auto ring_out = [&](int a) {
      float* base = rings.data() + a * ring * channels;
      return [=](int64_t v) { return base + (v & (ring - 1)) * channels; };
    };
    auto full_in = [&](int64_t id) -> const float* { return values + id * channels; };
    auto full_out = [&](int64_t v) { return values + (v + 1) * channels; };
    const int64_t chunks = (vertices + chunk - 1) / chunk;
    for (int64_t wave = 0; wave < chunks + axes - 1; ++wave) {
      for (int axis = 0; axis < axes; ++axis) {
        const int64_t c = wave - axis;
        if (c < 0 || c >= chunks) continue;
        const int64_t begin = c * chunk, end = std::min(vertices, begin + chunk);
        const bool first = axis == 0, last = axis == axes - 1;
        auto run = [&](const auto& in, const auto& out) {
          blur_vertices(lattice, axis, channels, used, sequential_rounding, in, out, begin, end);
        };
        if (first && last) {
          run(full_in, full_out);
        } else if (first) {
          run(full_in, ring_out(axis));
        } else if (last) {
          run(ring_in(axis - 1), full_out);
        } else {
          run(ring_in(axis - 1), ring_out(axis));
        }
      }
    }
    return values;
  }
  for (int axis = 0; axis < axes; ++axis) {
    const float* old_values = values;
    float* new_values = scratch;
    for_each_task(vertices, task_count(vertices, threads), [&](int64_t, int64_t begin, int64_t end) {
      blur_vertices(
          lattice, axis, channels, used, sequential_rounding,
          [&](int64_t id) { return old_values + id * channels; },
          [&](int64_t v) { return new_values + (v + 1) * channels; }, begin, end);
    });
    std::swap(values, scratch);
  }
  return values;
}

// A pairwise kernel ready for inference on one image: its lattice and normaliser.
// Symmetric normalisation scales a point's splat and its slice by the same factor, so
// it is folded into the point's barycentric weights (lattice.weight holds w n). That
// saves the passes a multiply per label vector, twice per point and kernel, and the
// normaliser's stream: the whole op for PSA's parameters, one thread, went from 128.9
// to 124.0 ms and from 132.3 to 120.3 (minima of two series). The products round
// differently from pydensecrf's w (n q) and n (sum w b): an ulp.
struct PreparedKernel {
  Lattice lattice;
  Normalization mode = kNormalizeSymmetric;
  LargeBuffer<float> norm;  // (N) per-point factor of NORMALIZE_BEFORE / AFTER, else empty
  bool scale_before() const { return mode == kNormalizeBefore; }
  bool scale_after() const { return mode == kNormalizeAfter; }
};

// The per-point end of preparing a kernel, for points [begin, end): their vertex ids
// as uint16 into lattice.narrow_vertex when it is sized, and when `blurred` (the
// blurred splat of ones, V + 1 rows) is given, their normaliser: folded into the
// weights when `symmetric`, else into `norm`. One pass over the ids and weights for
// both (at 500x375 the two passes they were took 1.2 and 1.9 ms for the Gaussian and
// bilateral lattices). kDim > 0 fixes d at compile time.
template <int kDim>
void finish_points(Lattice& lattice, const float* blurred, bool symmetric, float* norm,
                   int64_t begin, int64_t end) {
  const int corners = (kDim > 0 ? kDim : lattice.dim) + 1;
  const float alpha = lattice_alpha(lattice.dim);
  uint16_t* narrow = lattice.narrow_vertex.empty() ? nullptr : lattice.narrow_vertex.data();
  for (int64_t p = begin; p < end; ++p) {
    const int32_t* ids = lattice.vertex.data() + p * corners;
    if (narrow != nullptr) {
      for (int r = 0; r < corners; ++r) narrow[p * corners + r] = static_cast<uint16_t>(ids[r]);
    }
    if (blurred == nullptr) continue;
    // The slice in pydensecrf's single-channel rounding, (w v) alpha; the point's slice
    // reads only its own weights, so scaling them right after is safe.
    float* weights = lattice.weight.data() + p * corners;
    float sum = 0.0f;
    for (int r = 0; r < corners; ++r) sum += weights[r] * blurred[ids[r]] * alpha;
    const double shifted = static_cast<double>(sum) + 1e-20;
    const float n = static_cast<float>(symmetric ? 1.0 / std::sqrt(shifted) : 1.0 / shifted);
    if (symmetric) {
      for (int r = 0; r < corners; ++r) weights[r] *= n;
    } else {
      norm[p] = n;
    }
  }
}

PreparedKernel prepare_kernel(const float* features, int64_t stride, int dim, int64_t points,
                              const PointOrder& order, Normalization mode, int64_t threads) {
  PreparedKernel kernel;
  kernel.lattice = build_lattice(features, stride, dim, points, order, threads);
  kernel.mode = mode;
  Lattice& lattice = kernel.lattice;
  const int corners = dim + 1;
  if (lattice.num_vertices < 65535) lattice.narrow_vertex.resize(points * corners);
  // norm = K applied to ones, one channel, in pydensecrf's single-channel rounding.
  const int64_t rows = lattice.num_vertices + 1;
  LargeBuffer<float> values, scratch;
  const float* blurred = nullptr;
  if (mode != kNoNormalization) {
    values.assign(rows, 0.0f);
    scratch.assign(rows, 0.0f);
    for (int64_t i = 0; i < points * corners; ++i) values[lattice.vertex[i]] += lattice.weight[i];
    blurred = blur(lattice, values.data(), scratch.data(), 1, 1, true, threads);
  }
  const bool symmetric = mode == kNormalizeSymmetric;
  if (mode == kNormalizeBefore || mode == kNormalizeAfter) kernel.norm.resize(points);
  for_each_task(points, task_count(points, threads), [&](int64_t, int64_t begin, int64_t end) {
    float* norm = kernel.norm.data();
    dispatch_feature_dim(dim, [&](auto fixed) {
      finish_points<decltype(fixed)::value>(lattice, blurred, symmetric, norm, begin, end);
    });
  });
  return kernel;
}

// Compatibility of one kernel, padded to the label stride.
struct Compatibility {
  CompatKind kind = kPotts;
  float potts = 0.0f;
  LargeBuffer<float> weights;  // (Mp) diagonal, or (M, Mp) symmetrised matrix rows
};

Compatibility read_compatibility(const at::Tensor& tensor, int64_t labels, int64_t stride) {
  Compatibility compat;
  const at::Tensor values = tensor.contiguous();
  const float* data = values.data_ptr<float>();
  if (values.dim() == 0) {
    compat.kind = kPotts;
    compat.potts = data[0];
  } else if (values.dim() == 1) {
    compat.kind = kDiagonal;
    compat.weights.assign(stride, 0.0f);
    std::copy(data, data + labels, compat.weights.begin());
  } else {
    compat.kind = kMatrix;
    compat.weights.assign(labels * stride, 0.0f);
    for (int64_t i = 0; i < labels; ++i) {
      for (int64_t j = 0; j < labels; ++j) {
        compat.weights[i * stride + j] = 0.5f * (data[i * labels + j] + data[j * labels + i]);
      }
    }
  }
  return compat;
}

// Label planes (M, N) -> point rows (N, stride) for points [begin, end), which are
// pixels `pixel` onwards: row p, lane c is sign * planes[c * N + p + pixel - begin] for
// c < M and `pad` beyond. Returns 1 when a copied value is NaN or infinite, else 0.
uint32_t planes_to_rows(const float* planes, int64_t labels, int64_t points, int64_t stride,
                        float sign, float pad, int64_t begin, int64_t end, int64_t pixel,
                        float* rows) {
  const int64_t shift = pixel - begin;  // point p is pixel p + shift
  IntLanes bad = IntLanes{};
  int64_t p = begin;
  for (; p + kLanes <= end; p += kLanes) {
    for (int64_t c0 = 0; c0 < stride; c0 += kLanes) {
      Lanes tile[kLanes], transposed[kLanes];
      for (int64_t k = 0; k < kLanes; ++k) {
        if (c0 + k < labels) {
          const Lanes values = *as_lanes(planes + ((c0 + k) * points + (p + shift)));
          bad |= not_finite(values);
          tile[k] = sign * values;
        } else {
          tile[k] = broadcast(pad);
        }
      }
      transpose_tile(tile, transposed);
      for (int64_t j = 0; j < kLanes; ++j) *as_lanes(rows + (p + j) * stride + c0) = transposed[j];
    }
  }
  uint32_t found = 0;
  for (int64_t j = 0; j < kLanes; ++j) found |= bad[j] != 0;
  for (; p < end; ++p) {
    for (int64_t c = 0; c < stride; ++c) {
      if (c < labels) {
        const float value = planes[c * points + (p + shift)];
        found |= not_finite(value);
        rows[p * stride + c] = sign * value;
      } else {
        rows[p * stride + c] = pad;
      }
    }
  }
  return found;
}

// `count` point rows (stride floats each) from `rows` on -> label planes (M, N) at
// pixels `pixel` onwards.
void rows_to_planes(const float* rows, int64_t labels, int64_t points, int64_t stride,
                    int64_t count, int64_t pixel, float* planes) {
  int64_t p = 0;
  for (; p + kLanes <= count; p += kLanes) {
    for (int64_t c0 = 0; c0 < stride; c0 += kLanes) {
      Lanes tile[kLanes], transposed[kLanes];
      for (int64_t j = 0; j < kLanes; ++j) tile[j] = *as_lanes(rows + (p + j) * stride + c0);
      transpose_tile(tile, transposed);
      for (int64_t k = 0; k < kLanes && c0 + k < labels; ++k) {
        *as_lanes(planes + ((c0 + k) * points + (pixel + p))) = transposed[k];
      }
    }
  }
  for (; p < count; ++p) {
    for (int64_t c = 0; c < labels; ++c) planes[c * points + (pixel + p)] = rows[p * stride + c];
  }
}

// Everything one mean-field pass over the pixels of an image reads and writes.
struct MeanFieldPass {
  int64_t labels = 0;
  int64_t chunks = 0;  // label stride / kLanes
  bool sequential_rounding = false;
  const float* neg_unary = nullptr;  // (N, stride)
  const float* q = nullptr;          // (N, stride): the marginals splatted when not updated
  std::vector<const PreparedKernel*> kernels;
  std::vector<const Compatibility*> compat;
  std::vector<float> alpha;            // per kernel
  IntLanes last_chunk_labels{};        // -1 on the real labels of the last chunk, else 0
  // The kernel whose weights ride in the padding lanes of the -unary rows (lanes
  // labels .. labels + corners - 1), or -1: a stream less for every pass.
  int packed_kernel = -1;
  bool update_q = false;               // recompute q = softmax(energy)
  float* out = nullptr;                // (M, N) label planes to write the recomputed q to, or null
  int64_t num_points = 0;              // N
  const PointOrder* order = nullptr;   // the points' pixels, for `out`
  bool slice = false;                  // energy includes the kernels (else -unary alone)
  std::vector<const float*> blurred;   // per kernel: the values to slice
  std::vector<float*> splat_targets;   // kernel k, task t at k * tasks + t; empty: no splat
};

// One kernel's part of a pass, as plain pointers and numbers: read once per pass
// rather than through the vectors and structs for every pixel.
struct KernelStep {
  const int32_t* ids = nullptr;    // (N, corners) vertex ids + 1
  const uint16_t* narrow_ids = nullptr;  // the same as uint16, or null
  const float* weights = nullptr;  // barycentric weights: point p's at p * weight_stride
  int64_t weight_stride = 0;       // corners, or the -unary row stride when packed there
  bool weights_in_unary = false;   // packed into the -unary rows' padding lanes
  const float* norm = nullptr;     // (N) normaliser, or null
  const float* blurred = nullptr;  // values to slice, or null
  float* splat = nullptr;          // this task's splat buffer, or null
  int corners = 0;
  float alpha = 1.0f;
  bool scale_before = false;
  bool scale_after = false;
  const Compatibility* compat = nullptr;
};

// The step's vertex ids as `Id` (uint16_t: narrow_ids, int32_t: ids).
template <typename Id>
inline const Id* step_ids(const KernelStep& step) {
  if constexpr (std::is_same_v<Id, uint16_t>) {
    return step.narrow_ids;
  } else {
    return step.ids;
  }
}

// filtered = sum over the point's vertices of weight * alpha * blurred row; pydensecrf
// rounds (w*v)*alpha for <= 2 labels, (w*alpha)*v otherwise. kCorners > 0 fixes the
// vertex count (d+1) at compile time, Id the type the ids are read as.
template <int kCorners, typename Id>
inline void slice_rows(const KernelStep& step, int64_t p, int64_t chunks, bool sequential_rounding,
                       Lanes* filtered) {
  const int corners = kCorners > 0 ? kCorners : step.corners;
  const int64_t stride = chunks * kLanes;
  const Id* ids = step_ids<Id>(step) + p * corners;
  const float* weights = step.weights + p * step.weight_stride;
  for (int64_t j = 0; j < chunks; ++j) filtered[j] = Lanes{};
  for (int r = 0; r < corners; ++r) {
    const Lanes* row = as_lanes(step.blurred + int64_t{ids[r]} * stride);
    if (sequential_rounding) {
      for (int64_t j = 0; j < chunks; ++j) filtered[j] += weights[r] * row[j] * step.alpha;
    } else {
      const Lanes w = broadcast(weights[r] * step.alpha);
      for (int64_t j = 0; j < chunks; ++j) filtered[j] = multiply_add(w, row[j], filtered[j]);
    }
  }
}

// Splats pixels [first, first + count) of a block, q rows `q` (count, chunks), into
// this task's buffer. Normalised before, a pixel adds w (n q), pydensecrf's order: n q
// once per pixel, then the weight straight from memory per vertex.
template <int kCorners, int kChunks, typename Id>
void splat_block(const KernelStep& step, int64_t first, int64_t count, int64_t chunks,
                 const Lanes* q) {
  const int corners = kCorners > 0 ? kCorners : step.corners;
  if constexpr (kChunks > 0) chunks = kChunks;
  const int64_t stride = chunks * kLanes;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t p = first + i;
    const Id* ids = step_ids<Id>(step) + p * corners;
    const float* weights = step.weights + p * step.weight_stride;
    const Lanes* values = q + i * chunks;
    if constexpr (kChunks > 0) {
      // The pixel's q in registers: read through `values`, it would be loaded again
      // for every vertex, as a store to a lattice row might have changed it.
      Lanes local[kChunks];
      const Lanes n = broadcast(step.scale_before ? step.norm[p] : 1.0f);
      for (int64_t j = 0; j < kChunks; ++j) {
        local[j] = step.scale_before ? n * values[j] : values[j];
      }
      for (int r = 0; r < corners; ++r) {
        Lanes* row = as_lanes(step.splat + int64_t{ids[r]} * stride);
        const Lanes w = broadcast(weights[r]);
        for (int64_t j = 0; j < kChunks; ++j) row[j] = multiply_add(w, local[j], row[j]);
      }
    } else {
      const float n = step.scale_before ? step.norm[p] : 1.0f;
      for (int r = 0; r < corners; ++r) {
        Lanes* row = as_lanes(step.splat + int64_t{ids[r]} * stride);
        for (int64_t j = 0; j < chunks; ++j) {
          row[j] = multiply_add(broadcast(weights[r]), n * values[j], row[j]);
        }
      }
    }
  }
}

// energies = base - compat(slice of the kernel) for pixels [first, first + count) of a
// block, rows (count, chunks); `base` is -unary for the first kernel, `energies`
// itself for the next. One call per kernel and block, so that what a kernel is (its
// vertex count, compatibility, normalisation) is settled once per block, not per pixel.
// `scratch_row` (one row) holds the slice when the stride is not fixed; with kChunks >
// 0 it stays in registers.
template <int kCorners, int kChunks, typename Id>
void add_kernel_messages(const MeanFieldPass& pass, const KernelStep& step, int64_t first,
                         int64_t count, int64_t chunks, const Lanes* base, Lanes* scratch_row,
                         Lanes* energies) {
  if constexpr (kChunks > 0) chunks = kChunks;
  const int64_t stride = chunks * kLanes;
  const Compatibility& compat = *step.compat;
  const Lanes potts = broadcast(compat.potts);
  Lanes filtered_row[kChunks > 0 ? kChunks : 1];
  Lanes* filtered = kChunks > 0 ? filtered_row : scratch_row;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t p = first + i;
    slice_rows<kCorners, Id>(step, p, chunks, pass.sequential_rounding, filtered);
    if (step.scale_after) {
      const float n = step.norm[p];
      for (int64_t j = 0; j < chunks; ++j) filtered[j] *= n;
    }
    const Lanes* in = base + i * chunks;
    Lanes* out = energies + i * chunks;
    // energy -= compat(filtered), pydensecrf's convention (Potts: += w * filtered).
    if (compat.kind == kPotts) {
      for (int64_t j = 0; j < chunks; ++j) out[j] = multiply_add(potts, filtered[j], in[j]);
    } else if (compat.kind == kDiagonal) {
      const Lanes* v = as_lanes(compat.weights.data());
      for (int64_t j = 0; j < chunks; ++j) out[j] = in[j] - v[j] * filtered[j];
    } else if constexpr (kChunks == 0) {
      // Matrix compatibilities index single labels, which would force a fixed-stride
      // instantiation's rows out of registers: they run in this one only.
      const int64_t labels = pass.labels;
      const float* f = reinterpret_cast<const float*>(filtered);
      const float* e_in = reinterpret_cast<const float*>(in);
      float* e = reinterpret_cast<float*>(out);
      for (int64_t c = labels; c < stride; ++c) e[c] = e_in[c];
      for (int64_t c = 0; c < labels; ++c) {
        const float* row = compat.weights.data() + c * stride;
        float sum = 0.0f;
        for (int64_t l = 0; l < labels; ++l) sum += row[l] * f[l];
        e[c] = e_in[c] - sum;
      }
    }
  }
}

// q = softmax(energy) over the label rows of a block, kRows rows at a time (rows of
// `chunks` vectors; kChunks > 0 fixes that), in three sweeps over the block:
// softmax_maxima, softmax_exps, softmax_scale. Padding lanes (0 in
// `last_chunk_labels`) may hold anything (a kernel's weights, see
// MeanFieldPass::packed_kernel): they are taken as -inf, so they drop out of the max,
// and after exp the mask zeroes them.
//
// A row's softmax is one long dependent chain: max, lane reduction, exps, sum, lane
// reduction, division. Several rows in lockstep give the CPU independent work: four
// rows cut the whole op for PSA's parameters from 132 to 127 ms (one thread, 21
// labels; eight were slower than four). Run a group at a time, the chain still
// outlasted the out-of-order window, so each group waited for the one before. Swept
// a stage at a time, consecutive groups overlap. The softmax's share of a call (one
// thread, 500x375, PSA's parameters, TSC ticks, minima of 6-25 alternating calls):
// 2 labels 28.8-29.9 M -> 25.8-26.4 M, 81 labels 225-230 M -> 202-211 M, 21 labels
// unchanged (60 M). Each row's arithmetic is the same as before, so the marginals
// are too.

// top[i] = the largest energy of row i, in every lane.
template <int kRows, int kChunks>
inline void softmax_maxima(const Lanes* energy, int64_t runtime_chunks,
                           IntLanes last_chunk_labels, Lanes* top) {
  const int64_t chunks = kChunks > 0 ? kChunks : runtime_chunks;
  const Lanes minus_infinity = broadcast(-std::numeric_limits<float>::infinity());
  Lanes row_top[kRows];  // locals: stores through `top` could alias `energy`
  for (int i = 0; i < kRows; ++i) {
    const Lanes* row = energy + i * chunks;
    row_top[i] = chunks == 1 ? minus_infinity : row[0];
    for (int64_t j = 1; j + 1 < chunks; ++j) row_top[i] = row_top[i] > row[j] ? row_top[i] : row[j];
    const Lanes last = last_chunk_labels != 0 ? row[chunks - 1] : minus_infinity;
    row_top[i] = row_top[i] > last ? row_top[i] : last;
    if constexpr (kRows != 4) row_top[i] = all_lanes_max(row_top[i]);
  }
  if constexpr (kRows == 4) all_lanes_reduce4<LaneReduction::kMax>(row_top);
  std::copy_n(row_top, kRows, top);
}

// q = exp(energy - top) (padding lanes 0); total[i] = row i's exps summed by lane.
template <int kRows, int kChunks>
inline void softmax_exps(const Lanes* energy, int64_t runtime_chunks,
                         IntLanes last_chunk_labels, const Lanes* top, Lanes* q,
                         Lanes* total) {
  const int64_t chunks = kChunks > 0 ? kChunks : runtime_chunks;
  const Lanes minus_infinity = broadcast(-std::numeric_limits<float>::infinity());
  Lanes last[kRows];
  for (int i = 0; i < kRows; ++i) {
    last[i] = last_chunk_labels != 0 ? energy[i * chunks + chunks - 1] : minus_infinity;
  }
  Lanes sum[kRows] = {};  // locals: stores through `total` could alias `q`
  for (int64_t j = 0; j < chunks; ++j) {
    for (int i = 0; i < kRows; ++i) {
      const Lanes x = j + 1 == chunks ? last[i] : energy[i * chunks + j];
      Lanes& out = q[i * chunks + j];
      out = exp_nonpositive(x - top[i]);
      if (j + 1 == chunks) {  // exp(-87) is not 0: clear the padding lanes' bits
        out = reinterpret_cast<Lanes>(reinterpret_cast<IntLanes>(out) & last_chunk_labels);
      }
      sum[i] += out;
    }
  }
  std::copy_n(sum, kRows, total);
}

// q /= the sum of row i's exps (total[i] by lane, overwritten by its inverse).
template <int kRows, int kChunks>
inline void softmax_scale(Lanes* total, int64_t runtime_chunks, Lanes* q) {
  const int64_t chunks = kChunks > 0 ? kChunks : runtime_chunks;
  if constexpr (kRows == 4) {
    all_lanes_reduce4<LaneReduction::kInverseSum>(total);  // one division for four rows
  } else {
    for (int i = 0; i < kRows; ++i) total[i] = 1.0f / all_lanes_sum(total[i]);
  }
  for (int i = 0; i < kRows; ++i) {
    for (int64_t j = 0; j < chunks; ++j) q[i * chunks + j] *= total[i];
  }
}

// Starts loading `bytes` from `data` into L2 (not L1, where lines that arrive early
// evict lattice rows). Volatile assembly on x86: GCC deletes a loop of prefetch
// builtins as free of side effects, and compiles the builtin's hint 2 to prefetcht0.
inline void prefetch_into_l2(const void* data, int64_t bytes) {
  const char* bytes_at = static_cast<const char*>(data);
  for (int64_t line = 0; line < bytes; line += 64) {
#if defined(__x86_64__) || defined(__i386__)
    asm volatile("prefetcht1 %0" : : "m"(bytes_at[line]));
#else
    __builtin_prefetch(bytes_at + line, 0, 2);
    asm volatile("");
#endif
  }
}

// Calls body(corners, id) with corners a std::integral_constant of the kernel's vertex
// count (3 and 6, the Gaussian and bilateral kernels; 0: read at run time) and id a
// value of the type its vertex ids are read as (uint16_t where they fit: a stream of
// 2 bytes per corner instead of 4).
template <typename Body>
inline void dispatch_kernel_shape(const KernelStep& step, const Body& body) {
  const bool narrow = step.narrow_ids != nullptr;
  switch (step.corners) {
    case 3:
      narrow ? body(std::integral_constant<int, 3>{}, uint16_t{})
             : body(std::integral_constant<int, 3>{}, int32_t{});
      break;
    case 6:
      narrow ? body(std::integral_constant<int, 6>{}, uint16_t{})
             : body(std::integral_constant<int, 6>{}, int32_t{});
      break;
    default:
      body(std::integral_constant<int, 0>{}, int32_t{});
  }
}

// For points [begin, end): if `update_q`, q = softmax(-unary - sum_k compat_k(
// slice_k)) (the kernels only when `slice`), written to the label planes `pass.out`
// when they are set; else q is `pass.q`. Then, if splat targets are set, q is splatted
// into this task's buffers. kChunks > 0 fixes the label stride at compile time, so
// that a pixel's rows stay in registers; 0 reads it from the pass.
//
// The work goes block by block in phases (each kernel's messages, softmaxes, each
// kernel's splats): one pixel's chain of slice -> softmax -> splat is long and
// serial, and a loop over whole chains leaves the CPU little to overlap; within a
// phase every pixel's work is independent of the previous one's, and what a kernel
// is gets settled once per block. Each kernel's rows still receive their splats in
// point order, so the sums are those of a point-by-point pass.
template <int kChunks>
void mean_field_points(const MeanFieldPass& pass, int64_t task, int64_t begin, int64_t end) {
  const int64_t chunks = kChunks > 0 ? kChunks : pass.chunks;
  const int64_t stride = chunks * kLanes;
  const size_t num_kernels = pass.kernels.size();
  const bool do_splat = !pass.splat_targets.empty();
  std::vector<KernelStep> steps(num_kernels);
  for (size_t k = 0; k < num_kernels; ++k) {
    const PreparedKernel& kernel = *pass.kernels[k];
    KernelStep& step = steps[k];
    step.ids = kernel.lattice.vertex.data();
    step.narrow_ids = kernel.lattice.narrow_vertex.empty() ? nullptr
                                                           : kernel.lattice.narrow_vertex.data();
    const bool packed = static_cast<int>(k) == pass.packed_kernel;
    step.weights = packed ? pass.neg_unary + pass.labels : kernel.lattice.weight.data();
    step.weight_stride = packed ? stride : kernel.lattice.dim + 1;
    step.weights_in_unary = packed;
    step.norm = kernel.norm.empty() ? nullptr : kernel.norm.data();
    step.blurred = pass.slice ? pass.blurred[k] : nullptr;
    step.splat = do_splat ? pass.splat_targets[k * (pass.splat_targets.size() / num_kernels) + task]
                          : nullptr;
    step.corners = kernel.lattice.dim + 1;
    step.alpha = pass.alpha[k];
    step.scale_before = kernel.scale_before();
    step.scale_after = kernel.scale_after();
    step.compat = pass.compat[k];
  }
  // Per block: energies and q rows, and one row of slice scratch; all of it stays in
  // L1.
  LargeBuffer<float> scratch((2 * kBlockPoints + 1) * stride);  // cache-line aligned
  Lanes* energies = as_lanes(scratch.data());
  Lanes* q_block = energies + kBlockPoints * chunks;
  Lanes* scratch_row = q_block + kBlockPoints * chunks;

  // A pass streams the per-point arrays from memory (at 500x375 with 21 labels: the
  // -unary rows, 18 MB with the Gaussian kernel's weights, the other corners and
  // weights, 7.9 MB with uint16 ids, and the normalisers of NORMALIZE_BEFORE / AFTER),
  // and the hardware prefetchers leave the slices waiting for them. Prefetching their
  // share four blocks ahead cut the whole op for PSA's parameters (lattices and 10
  // steps, one thread) from 137 to 127 ms: the -unary rows most of it, the rest 1-3 ms
  // (ahead 2 to 8 blocks measure alike; into L1 instead of L2 it was 9 ms slower).
  // The prefetches go out a few lines at a time, one softmax group's share before each
  // group, not as a burst of some 70 lines at the start of the block: inference(10)
  // min 83.4 -> 78.3 ms, q25 84.7 -> 81.7 (30 rounds). Prefetching the lattice rows
  // the block will touch made it slower.
  constexpr int64_t kPrefetchBlocks = 4;
  // Prefetches the streams of points [first, first + points).
  auto prefetch_points = [&](int64_t first, int64_t points) {
    if (first + points > end) return;
    if (pass.update_q) {
      prefetch_into_l2(pass.neg_unary + first * stride, points * stride * sizeof(float));
    }
    for (const KernelStep& step : steps) {
      const int64_t corners = points * step.corners;
      if (step.narrow_ids != nullptr) {
        prefetch_into_l2(step.narrow_ids + first * step.corners, corners * sizeof(uint16_t));
      } else {
        prefetch_into_l2(step.ids + first * step.corners, corners * sizeof(int32_t));
      }
      if (!step.weights_in_unary) {  // else they come with the -unary rows
        prefetch_into_l2(step.weights + first * step.corners, corners * sizeof(float));
      }
      if (step.norm != nullptr) prefetch_into_l2(step.norm + first, points * sizeof(float));
    }
  };

  for (int64_t block = begin; block < end; block += kBlockPoints) {
    const int64_t count = std::min(kBlockPoints, end - block);
    const Lanes* q_rows = q_block;
    const int64_t ahead = block + kPrefetchBlocks * kBlockPoints;
    if (!pass.update_q) {
      prefetch_points(ahead, kBlockPoints);  // no softmax groups
      q_rows = as_lanes(pass.q + block * stride);
    } else {
      const Lanes* unary = as_lanes(pass.neg_unary + block * stride);
      const Lanes* base = unary;  // the energies so far
      if (pass.slice) {
        for (const KernelStep& step : steps) {
          auto add = [&](auto corners, auto id) {
            add_kernel_messages<decltype(corners)::value, kChunks, decltype(id)>(
                pass, step, block, count, chunks, base, scratch_row, energies);
          };
          dispatch_kernel_shape(step, add);
          base = energies;
        }
      }
      // Rows in lockstep while their vectors fit the registers; the last count % kRows
      // rows one by one.
      constexpr int kRows = kChunks == 0 ? 1 : kChunks <= 3 ? 4 : kChunks <= 6 ? 2 : 1;
      static_assert(kBlockPoints % kRows == 0, "a full block's groups prefetch a whole block");
      const int64_t grouped = count - count % kRows;
      const IntLanes last_labels = pass.last_chunk_labels;
      Lanes top[kBlockPoints], total[kBlockPoints];
      for (int64_t i = 0; i < grouped; i += kRows) {
        softmax_maxima<kRows, kChunks>(base + i * chunks, chunks, last_labels, top + i);
      }
      for (int64_t i = grouped; i < count; ++i) {
        softmax_maxima<1, kChunks>(base + i * chunks, chunks, last_labels, top + i);
      }
      for (int64_t i = 0; i < grouped; i += kRows) {
        prefetch_points(ahead + i, kRows);
        softmax_exps<kRows, kChunks>(base + i * chunks, chunks, last_labels, top + i,
                                     q_block + i * chunks, total + i);
      }
      for (int64_t i = grouped; i < count; ++i) {
        softmax_exps<1, kChunks>(base + i * chunks, chunks, last_labels, top + i,
                                 q_block + i * chunks, total + i);
      }
      for (int64_t i = 0; i < grouped; i += kRows) {
        softmax_scale<kRows, kChunks>(total + i, chunks, q_block + i * chunks);
      }
      for (int64_t i = grouped; i < count; ++i) {
        softmax_scale<1, kChunks>(total + i, chunks, q_block + i * chunks);
      }
      // Straight from L1 into the label planes. Before, the last pass wrote point rows
      // of the marginals (18 MB at 500x375 with 21 labels) and a transpose after it
      // read them back: the last pass and the transpose took 7.0 ms (min) and 7.6
      // (median), the pass alone now 6.5 and 7.4 (40 alternating rounds, one thread).
      if (pass.out != nullptr) {
        pass.order->for_each_run_by_point(
            block, block + count, [&](int64_t point, int64_t pixel, int64_t run) {
              rows_to_planes(reinterpret_cast<const float*>(q_block + (point - block) * chunks),
                             pass.labels, pass.num_points, stride, run, pixel, pass.out);
            });
      }
    }
    if (!do_splat) continue;
    for (const KernelStep& step : steps) {
      auto splat = [&](auto corners, auto id) {
        splat_block<decltype(corners)::value, kChunks, decltype(id)>(step, block, count, chunks,
                                                                   q_rows);
      };
      dispatch_kernel_shape(step, splat);
    }
  }
}

// Label strides, in vectors, with a fixed-stride instantiation of their own: up to 96
// labels (Cityscapes' 19, VOC's 21, COCO's 81). Fixed strides keep a pixel's rows in
// registers; at 81 labels the generic one took 610 ms against 429 (inference(10),
// one thread, 500x375). Wider rows and matrix compatibilities take the generic one.
constexpr int kMaxFixedChunks = 12;

template <int... kChunksMinusOne>
void run_fixed_stride(const MeanFieldPass& pass, int64_t task, int64_t begin, int64_t end,
                      std::integer_sequence<int, kChunksMinusOne...>) {
  const bool ran = ((pass.chunks == kChunksMinusOne + 1
                         ? (mean_field_points<kChunksMinusOne + 1>(pass, task, begin, end), true)
                         : false) ||
                    ...);
  if (!ran) mean_field_points<0>(pass, task, begin, end);
}

void run_mean_field_points(const MeanFieldPass& pass, int64_t task, int64_t begin, int64_t end) {
  const bool any_matrix = std::any_of(pass.compat.begin(), pass.compat.end(),
                                      [](const Compatibility* c) { return c->kind == kMatrix; });
  if (any_matrix) return mean_field_points<0>(pass, task, begin, end);
  run_fixed_stride(pass, task, begin, end, std::make_integer_sequence<int, kMaxFixedChunks>{});
}

// Lattice values of one kernel: `rows` x `stride` floats starting `shift` floats into
// the allocation. Buffers used side by side get different shifts so that the same
// row of two of them never shares its low 12 address bits: with equal bits a load
// waits behind an unrelated store to the other buffer (4K aliasing), which costs
// more than the arithmetic here.
class LatticeValues {
 public:
  LatticeValues() = default;
  LatticeValues(int64_t size, int64_t shift) : storage_(size + shift, 0.0f), shift_(shift) {}
  float* data() { return storage_.data() + shift_; }
  void clear() { std::fill(storage_.begin() + shift_, storage_.end(), 0.0f); }

 private:
  LargeBuffer<float> storage_;
  int64_t shift_ = 0;
};

// Mean-field inference for one image, its points visited in `order` (the kernels'
// lattices built in it).
//   unary (M, N), init_q (M, N) or null, out (M, N).
void infer_image(const float* unary, const float* init_q, float* out, int64_t labels,
                 int64_t points, const PointOrder& order,
                 const std::vector<const PreparedKernel*>& kernels,
                 const std::vector<Compatibility>& compat, int64_t iterations, int64_t threads) {
  const int64_t stride = round_up(labels, kLanes);
  const int64_t tasks = task_count(points, threads);
  const size_t num_kernels = kernels.size();

  // The kernel with the most corners that fit the -unary rows' padding lanes rides
  // there (PSA's 21 labels leave 3: the Gaussian kernel's weights).
  int packed_kernel = -1;
  for (size_t k = 0; k < num_kernels; ++k) {
    const int corners = kernels[k]->lattice.dim + 1;
    if (corners <= stride - labels &&
        (packed_kernel < 0 || corners > kernels[packed_kernel]->lattice.dim + 1)) {
      packed_kernel = static_cast<int>(k);
    }
  }
  const float* packed_weights =
      packed_kernel < 0 ? nullptr : kernels[packed_kernel]->lattice.weight.data();
  const int packed_corners = packed_kernel < 0 ? 0 : kernels[packed_kernel]->lattice.dim + 1;

  // Point-major copies of -unary (padding lanes -inf, or the packed kernel's weights;
  // either way they take no part in the softmax) and of init_q when it is splatted
  // (after no step, init_q itself is the result).
  const float* splatted_q = iterations > 0 ? init_q : nullptr;
  LargeBuffer<float> neg_unary(points * stride);
  LargeBuffer<float> q(splatted_q != nullptr ? points * stride : 0);
  // The rows are written in point order. In strips each run then reads its pixels of
  // every label plane one image row below the last run's, a pattern the hardware
  // prefetchers miss: the planes' lines two rows further down are prefetched (the
  // transpose at 500x375 with 21 labels, 24 calls in a noisy hour: min 2.9 ms and
  // median 5.3-5.7, against 3.5-4.0 and 6.7-7.2 read in pixel order).
  std::vector<uint32_t> bad(tasks, 0);
  const int64_t image_width = order.strip_image_width();
  constexpr int64_t kPrefetchImageRows = 2;
  for_each_task(points, tasks, [&](int64_t task, int64_t begin, int64_t end) {
    order.for_each_run_by_point(begin, end, [&](int64_t point, int64_t pixel, int64_t count) {
      const int64_t ahead = pixel + kPrefetchImageRows * image_width;
      if (image_width > 0 && ahead + count <= points) {
        for (int64_t c = 0; c < labels; ++c) {
          prefetch_into_l2(unary + c * points + ahead, count * sizeof(float));
          if (splatted_q != nullptr) {
            prefetch_into_l2(splatted_q + c * points + ahead, count * sizeof(float));
          }
        }
      }
      bad[task] |= planes_to_rows(unary, labels, points, stride, -1.0f,
                                  -std::numeric_limits<float>::infinity(), point, point + count,
                                  pixel, neg_unary.data());
      for (int64_t p = point; p < point + count && packed_weights != nullptr; ++p) {
        std::copy_n(packed_weights + p * packed_corners, packed_corners,
                    neg_unary.data() + p * stride + labels);
      }
      if (splatted_q != nullptr) {
        planes_to_rows(splatted_q, labels, points, stride, 1.0f, 0.0f, point, point + count, pixel,
                       q.data());
      }
    });
  });
  TORCH_CHECK_VALUE(std::all_of(bad.begin(), bad.end(), [](uint32_t found) { return found == 0; }),
                    "unary contains NaN or infinite energies");

  MeanFieldPass pass;
  pass.labels = labels;
  pass.chunks = stride / kLanes;
  pass.sequential_rounding = labels <= 2;
  pass.neg_unary = neg_unary.data();
  pass.q = q.data();
  pass.num_points = points;
  pass.order = &order;
  for (int64_t i = 0; i < kLanes; ++i) {
    pass.last_chunk_labels[i] = (stride - kLanes + i) < labels ? -1 : 0;
  }
  pass.packed_kernel = packed_kernel;
  pass.kernels = kernels;
  for (size_t k = 0; k < num_kernels; ++k) {
    pass.compat.push_back(&compat[k]);
    pass.alpha.push_back(lattice_alpha(kernels[k]->lattice.dim));
  }

  // Per kernel: `sums`, where the splats add up, and `values`, what the passes slice.
  // The blur filters `sums`, with `values` (sliced by the previous pass, no longer
  // needed) as its second buffer, and the two trade places when the result lands in
  // `sums`. With one task the pass splats straight into `sums`: two lattice-sized
  // buffers per kernel, not three, in a pass whose data (33 MB at 500x375 with 21
  // labels) is about the size of the L3. With several tasks each splats into a buffer
  // of its own (kernel k's at k * tasks + task), summed into `sums` in task order.
  std::vector<LatticeValues> values(num_kernels), sums(num_kernels);
  std::vector<LatticeValues> splat(tasks > 1 ? num_kernels * tasks : 0);
  if (iterations > 0) {
    for (size_t k = 0; k < num_kernels; ++k) {
      const int64_t size = (kernels[k]->lattice.num_vertices + 1) * stride;
      // Shifts of distinct odd numbers of cache lines (16 floats) per buffer.
      int64_t line = 2 * static_cast<int64_t>(k) * (tasks + 2) + 1;
      values[k] = LatticeValues(size, 16 * line);
      sums[k] = LatticeValues(size, 16 * (line + 2));
      if (tasks > 1) {
        for (int64_t t = 0; t < tasks; ++t) {
          splat[k * tasks + t] = LatticeValues(size, 16 * (line + 4 + 2 * t));
        }
      }
    }
  }
  auto set_splat_targets = [&](bool enabled) {
    pass.splat_targets.clear();
    if (!enabled) return;
    for (auto& buffer : tasks == 1 ? sums : splat) pass.splat_targets.push_back(buffer.data());
  };

  // Sums the task buffers into `sums` in task order and clears them.
  auto gather_splats = [&]() {
    if (tasks == 1) return;  // the pass splatted into `sums` itself
    for (size_t k = 0; k < num_kernels; ++k) {
      const int64_t rows = kernels[k]->lattice.num_vertices + 1;
      for_each_task(rows, task_count(rows, threads), [&](int64_t, int64_t begin, int64_t end) {
        float* target = sums[k].data();
        std::fill(target + begin * stride, target + end * stride, 0.0f);
        for (int64_t t = 0; t < tasks; ++t) {
          float* source = splat[k * tasks + t].data();
          for (int64_t i = begin * stride; i < end * stride; ++i) {
            target[i] += source[i];
            source[i] = 0.0f;
          }
        }
      });
    }
  };

  auto run_pass = [&]() {
    for_each_task(points, tasks, [&](int64_t task, int64_t begin, int64_t end) {
      run_mean_field_points(pass, task, begin, end);
    });
  };

  // Q0 = softmax(-unary), or init_q; splatted for the first step.
  if (iterations == 0 && init_q != nullptr) {
    std::copy_n(init_q, labels * points, out);
    return;
  }
  pass.update_q = init_q == nullptr;
  pass.out = iterations == 0 ? out : nullptr;
  set_splat_targets(iterations > 0);
  run_pass();
  if (iterations > 0) gather_splats();

  pass.slice = true;
  pass.update_q = true;
  pass.blurred.resize(num_kernels);
  for (int64_t iteration = 0; iteration < iterations; ++iteration) {
    const bool last = iteration + 1 == iterations;
    for (size_t k = 0; k < num_kernels; ++k) {
      float* result = blur(kernels[k]->lattice, sums[k].data(), values[k].data(), stride,
                           labels, pass.sequential_rounding, threads);
      if (result == sums[k].data()) std::swap(values[k], sums[k]);
      pass.blurred[k] = values[k].data();
      if (tasks == 1 && !last) sums[k].clear();  // this pass's splat target
    }
    pass.out = last ? out : nullptr;
    set_splat_targets(!last);
    run_pass();
    if (!last) gather_splats();
  }
}

}  // namespace

at::Tensor finite_copy_cpu(const at::Tensor& values, c10::string_view name) {
  TORCH_CHECK_VALUE(values.scalar_type() == at::kFloat, name, " must be float32, got ",
                    values.scalar_type());
  const at::Tensor source = values.contiguous();
  const size_t bytes = source.numel() * sizeof(float);
  at::Tensor copy = at::from_blob(
      allocate_large(bytes), source.sizes(),
      [bytes](void* data) { release_large(data, bytes); }, source.options());
  TORCH_CHECK_VALUE(all_finite(source.data_ptr<float>(), source.numel(), at::get_num_threads(),
                               copy.data_ptr<float>()),
                    name, " contains NaN or infinite values");
  return copy;
}

at::Tensor dense_crf_inference_cpu(const at::Tensor& unary, at::TensorList features,
                                   at::TensorList compat, at::IntArrayRef normalization,
                                   int64_t iterations, const c10::optional<at::Tensor>& init_q,
                                   int64_t grid_width) {
  check_dense_crf_arguments(unary, features, compat, normalization, iterations, init_q,
                            grid_width);
  const int64_t batch = unary.size(0);
  const int64_t labels = unary.size(1);
  const int64_t points = unary.size(2);
  const int64_t stride = round_up(labels, kLanes);
  const at::Tensor unary_c = unary.contiguous();
  at::Tensor init_c;
  if (init_q.has_value()) init_c = init_q->contiguous();
  // The marginals come from the pool of large blocks too (see large_buffer.h).
  const size_t out_bytes = batch * labels * points * sizeof(float);
  at::Tensor out = at::from_blob(
      allocate_large(out_bytes), {batch, labels, points},
      [out_bytes](void* data) { release_large(data, out_bytes); }, unary.options());
  const size_t num_kernels = features.size();

  std::vector<at::Tensor> feature_c(num_kernels);
  std::vector<bool> shared(num_kernels);
  std::vector<Compatibility> compat_rows(num_kernels);
  for (size_t k = 0; k < num_kernels; ++k) {
    // A batch stride of 0 (an expanded tensor) means one lattice for every image.
    shared[k] = batch == 1 || features[k].stride(0) == 0;
    at::Tensor first = shared[k] ? features[k][0] : features[k];
    feature_c[k] = first.contiguous();
    compat_rows[k] = read_compatibility(compat[k], labels, stride);
  }

  const int64_t threads = at::get_num_threads();
  const PointOrder order(points, grid_width);
  for (size_t k = 0; k < num_kernels; ++k) {
    TORCH_CHECK_VALUE(all_finite(feature_c[k].data_ptr<float>(), feature_c[k].numel(), threads),
                      "features[", k, "] contains NaN or infinite values");
  }
  auto prepare = [&](size_t k, int64_t image, int64_t inner_threads) {
    const int dim = static_cast<int>(features[k].size(1));
    const float* data = feature_c[k].data_ptr<float>() + (shared[k] ? 0 : image * dim * points);
    return std::make_unique<PreparedKernel>(
        prepare_kernel(data, points, dim, points, order,
                       static_cast<Normalization>(normalization[k]), inner_threads));
  };

  // Lattices shared by the whole batch are built once, with every thread.
  std::vector<std::unique_ptr<PreparedKernel>> shared_kernels(num_kernels);
  for (size_t k = 0; k < num_kernels; ++k) {
    if (shared[k]) shared_kernels[k] = prepare(k, 0, threads);
  }

  auto run_image = [&](int64_t image, int64_t inner_threads) {
    std::vector<std::unique_ptr<PreparedKernel>> own(num_kernels);
    std::vector<const PreparedKernel*> kernels(num_kernels);
    for (size_t k = 0; k < num_kernels; ++k) {
      if (!shared[k]) own[k] = prepare(k, image, inner_threads);
      kernels[k] = shared[k] ? shared_kernels[k].get() : own[k].get();
    }
    const int64_t offset = image * labels * points;
    infer_image(unary_c.data_ptr<float>() + offset,
                init_c.defined() ? init_c.data_ptr<float>() + offset : nullptr,
                out.data_ptr<float>() + offset, labels, points, order, kernels, compat_rows,
                iterations, inner_threads);
  };

  if (batch >= threads && threads > 1) {
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t image = begin; image < end; ++image) run_image(image, 1);
    });
  } else {
    for (int64_t image = 0; image < batch; ++image) run_image(image, threads);
  }
  return out;
}

}  // namespace crf
}  // namespace wsss_fast
