// One parameter's Adam-family step with block-quantized state, as an MLX primitive.
//
// adamkit.mlx's quantized step in MLX operations runs the codec's stages as separate
// passes over memory (MLX compiles no gather or reduction into a fused loop on the
// CPU). This primitive does the step of adamkit.mlx._rules._quant_step in one pass per
// block, in a block-sized scratch row per moment: decode (codes written at step t-1),
// the rule, masking and skipping, the new block maxima, encode (at step t). The
// arithmetic is the MLX rule's, in float32 and operation for operation (built with
// -ffp-contract=off: no fused multiply-adds); the codec is adamkit.quant.blockwise's,
// its tables handed in by the caller (adamkit.mlx._codec.tables), so the codes are
// the reference codec's.
//
// The Python entry point checks every input (dtype, size, table lengths, attributes)
// and makes each row-contiguous through MLX's own contiguous(); eval_cpu checks the
// evaluated inputs again before dispatching, so the kernel only dereferences what it
// has checked. Large tensors are split over threads by whole blocks.
//
// Built on first use by adamkit.mlx._native (with nanobind, in MLX's nanobind domain).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace {

// The order of adamkit.mlx._rules.CONSTS.
enum Const {
  STEP_SIZE, BC2_SQRT, BC2, DECAY, L2_, B1W, LERP_LOW, LERP_C1, BETA2, B2W, EPS, LR, MU, MU_NEXT, OK,
  N_CONSTS
};
enum Algorithm { ADAM = 0, ADAMAX = 1, NADAM = 2 };

constexpr int MAX_BLOCK = 4096;
constexpr int MAX_MOMENTS = 3;
constexpr uint32_t DITHER_ALONG = 3242174889u;
constexpr uint32_t DITHER_STEP = 2654435769u;
constexpr float TINY = 1.17549435e-38f;  // 2^-126

// One moment's codebook and its tables (pointers into checked, evaluated inputs).
struct Book {
  int bits = 8;
  bool dither = false;
  bool root = false;
  bool clamp_zero = false;
  float lowest = 0.0f;
  // 8-bit: values[256], packed[2 * half]; 4-bit dithered: values, rate, offset [16],
  // first, threshold [32], slopes [32] (up at c, down at c + 16), cell [2]
  const float* values = nullptr;
  const int32_t* packed = nullptr;
  const float* rate = nullptr;
  const float* offset = nullptr;
  const int32_t* first = nullptr;
  const float* threshold = nullptr;
  const float* slopes = nullptr;
  const float* cell = nullptr;
};

struct Layout {  // the encoder table's constants (adamkit.quant.codebooks)
  uint32_t low_bits, one_bits;
  int shift;
  uint32_t half;
};

inline uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}

inline float from_bits(uint32_t b) {
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}

inline bool finite(float x) {
  return std::fabs(x) < INFINITY;
}

template <typename T>
inline float load(const T* p, size_t i) {
  return static_cast<float>(p[i]);
}

template <typename T>
inline T store(float x) {
  return static_cast<T>(x);
}

struct Step {
  int algorithm, moments;
  bool amsgrad, maximize, mask;
  size_t n;
  int block;
  float huge;
  Layout layout;
  Book books[MAX_MOMENTS];
  // evaluated inputs
  const float* c;
  uint32_t t;
  float product;  // NAdam: mu_product after this step's multiplication
  const uint8_t* codes_in[MAX_MOMENTS];
  const float* absmax_in[MAX_MOMENTS];
  uint8_t* codes_out[MAX_MOMENTS];
  float* absmax_out[MAX_MOMENTS];

  // Decode block b of moment k into row (its first `len` elements): one loop per
  // codebook kind, without branches.
  template <bool ROOT>
  static void decode8(const uint8_t* __restrict codes, const float* __restrict values, float scale,
                      float* __restrict row, int len) {
    for (int i = 0; i < len; ++i) {
      const float x = values[codes[i]] * scale;
      row[i] = ROOT ? x * x : x;
    }
  }

  template <bool ROOT>
  void decode4(const Book& bk, const uint8_t* __restrict bytes, size_t start, float scale, float* __restrict row,
               int len) const {
    const float* __restrict values = bk.values;
    const float* __restrict slopes = bk.slopes;
    uint32_t h = static_cast<uint32_t>(start) * DITHER_ALONG + (t - 1u) * DITHER_STEP;  // written at step t - 1
    for (int i = 0; i < len; ++i, h += DITHER_ALONG) {
      const uint8_t byte = bytes[i >> 1];
      const int code = (i & 1) ? (byte >> 4) : (byte & 0xF);
      const float back = static_cast<float>(32768 - static_cast<int32_t>(h >> 16));
      const float slope = slopes[code + (back < 0.0f ? 16 : 0)];
      const float x = (values[code] + back * slope) * scale;
      row[i] = ROOT ? x * x : x;
    }
  }

  void decode(int k, size_t b, int len, float* row) const {
    const Book& bk = books[k];
    const float scale = absmax_in[k][b];
    const size_t start = b * static_cast<size_t>(block);
    if (bk.bits == 8) {
      const uint8_t* codes = codes_in[k] + start;
      return bk.root ? decode8<true>(codes, bk.values, scale, row, len) : decode8<false>(codes, bk.values, scale, row, len);
    }
    const uint8_t* bytes = codes_in[k] + start / 2;  // blocks have an even size
    return bk.root ? decode4<true>(bk, bytes, start, scale, row, len) : decode4<false>(bk, bytes, start, scale, row, len);
  }

  // the block's scale: its largest finite magnitude (of the roots, for a root codebook),
  // as an integer maximum over the magnitudes' bits (their order for floats >= 0;
  // a non-finite one, whose exponent bits are all set, counts as 0)
  template <bool ROOT>
  static uint32_t magnitude_bits(float x) {
    const uint32_t r = bits_of(ROOT ? std::sqrt(x) : x) & 0x7FFFFFFFu;
    return r < 0x7F800000u ? r : 0u;
  }

  template <bool ROOT>
  static float block_absmax(const float* __restrict row, int len) {
    constexpr int LANES = 16;  // independent maxima, which the compiler keeps in vector registers
    uint32_t lanes[LANES] = {};
    int i = 0;
    for (; i + LANES <= len; i += LANES)
      for (int l = 0; l < LANES; ++l) {
        const uint32_t r = magnitude_bits<ROOT>(row[i + l]);
        lanes[l] = lanes[l] > r ? lanes[l] : r;
      }
    uint32_t top = 0;
    for (; i < len; ++i) top = std::max(top, magnitude_bits<ROOT>(row[i]));
    for (int l = 0; l < LANES; ++l) top = std::max(top, lanes[l]);
    return from_bits(top);
  }

  // y: x over the block's scale, as the reference (a non-finite value saturated, NaN to +absmax)
  template <bool ROOT>
  static float normalized(float x, float top, float scale, float inv) {
    float r = ROOT ? std::sqrt(x) : x;
    r = std::fabs(r) < INFINITY ? r : (r < 0.0f ? -top : top);
    return (r * scale) * inv;
  }

  // (The encoders read every table, constant and the step through locals: their stores
  // are of uint8_t, which may alias anything, so members would be reloaded each element.)
  template <bool ROOT, bool CLAMP_ZERO>
  void encode8(const Book& bk, const float* __restrict row, uint8_t* __restrict out, int len, float top, float scale,
               float inv) const {
    const int32_t* __restrict packed = bk.packed;
    const uint32_t low_bits = layout.low_bits, one_bits = layout.one_bits, half = layout.half;
    const int shift = layout.shift;
    for (int i = 0; i < len; ++i) {
      const float x = row[i];
      const uint32_t yb = bits_of(normalized<ROOT>(x, top, scale, inv));
      const uint32_t magnitude = std::clamp(yb & 0x7FFFFFFFu, low_bits, one_bits);
      const uint32_t index = ((magnitude - low_bits) >> shift) + (yb >> 31) * half;
      const int32_t entry = packed[index];
      const int32_t low = entry & 0xFFFF, candidate = entry >> 16;
      const int32_t mine = static_cast<int32_t>(yb & 0xFFFF);
      const int32_t sign = 1 - 2 * static_cast<int32_t>(yb >> 31);
      int32_t code = candidate + ((mine - low) * sign > 0 ? 1 : 0);
      if (CLAMP_ZERO) code = x <= 0.0f ? code : std::max(code, 1);  // a value above 0 (or NaN) is not 0
      out[i] = static_cast<uint8_t>(std::clamp(code, 0, 255));
    }
  }

  template <bool ROOT>
  void encode4(const Book& bk, const float* __restrict row, uint8_t* __restrict out, size_t start, int len, float top,
               float scale, float inv) const {
    const float* __restrict rate = bk.rate;
    const float* __restrict offset = bk.offset;
    const int32_t* __restrict first = bk.first;
    const float* __restrict threshold = bk.threshold;
    const float lowest = bk.lowest, cell_scale = bk.cell[0], cell_offset = bk.cell[1];
    const uint32_t phase = t * DITHER_STEP;
    uint32_t h = static_cast<uint32_t>(start) * DITHER_ALONG + phase;  // the dither's hash, element by element
    uint8_t codes[MAX_BLOCK + 1];
    for (int i = 0; i < len; ++i, h += DITHER_ALONG) {
      float y = normalized<ROOT>(row[i], top, scale, inv);
      y = std::min(y > lowest ? y : lowest, 2.0f);  // NaN: the lowest value
      const int cell = std::clamp(static_cast<int32_t>(y * cell_scale + cell_offset), 0, 31);
      const int interval = std::clamp(first[cell] + (y >= threshold[cell] ? 1 : 0), 0, 15);  // rate, offset: 16
      const int32_t position = static_cast<int32_t>(y * rate[interval] + offset[interval]);
      codes[i] = static_cast<uint8_t>(std::clamp((position + static_cast<int32_t>(h >> 16)) >> 16, 0, 15));
    }
    if (len & 1) codes[len] = 0;  // odd size: the last byte's high nibble is 0
    for (int i = 0; i < (len + 1) / 2; ++i) out[i] = static_cast<uint8_t>(codes[2 * i] | (codes[2 * i + 1] << 4));
  }

  // encode the new row of block b of moment k, and store its scale
  void encode(int k, size_t b, int len, const float* row) const {
    const Book& bk = books[k];
    const size_t start = b * static_cast<size_t>(block);
    const float top = bk.root ? block_absmax<true>(row, len) : block_absmax<false>(row, len);
    absmax_out[k][b] = top;
    const float scale = top < TINY ? 18446744073709551616.0f : 1.0f;  // 2^64: 1 / a subnormal overflows
    const float inv = top > 0.0f ? 1.0f / (top * scale) : 0.0f;
    if (bk.bits == 4) {
      uint8_t* out = codes_out[k] + start / 2;
      return bk.root ? encode4<true>(bk, row, out, start, len, top, scale, inv)
                     : encode4<false>(bk, row, out, start, len, top, scale, inv);
    }
    uint8_t* out = codes_out[k] + start;
    if (bk.root) {
      return bk.clamp_zero ? encode8<true, true>(bk, row, out, len, top, scale, inv)
                           : encode8<true, false>(bk, row, out, len, top, scale, inv);
    }
    return bk.clamp_zero ? encode8<false, true>(bk, row, out, len, top, scale, inv)
                         : encode8<false, false>(bk, row, out, len, top, scale, inv);
  }

  // The rule over one block, from and into the decoded rows, the new parameters into
  // `out`. One loop per algorithm and option set, without branches, so that the
  // compiler vectorizes it (sqrt and division included).
  template <int ALG, bool AMSGRAD, bool L2, typename P, typename G>
  void rule(const P* __restrict pin, const G* __restrict gin, float* __restrict m, float* __restrict v,
            float* __restrict w, float* __restrict out, int len) const {
    const float sign = maximize ? -1.0f : 1.0f;
    const float l2 = c[L2_], decay = c[DECAY], lerp_c1 = c[LERP_C1], beta2 = c[BETA2], b2w = c[B2W];
    const float eps = c[EPS], step_size = c[STEP_SIZE], bc2_sqrt = c[BC2_SQRT], bc2 = c[BC2];
    const float from_m = c[LERP_LOW] > 0.0f ? 1.0f : 0.0f;  // torch's lerp: from m for a weight below 1/2
    // NAdam's coefficients, as the MLX rule computes them in float32
    const float lr = c[LR], mu = c[MU], mu_next = c[MU_NEXT];
    const float nadam_g = (lr * (1.0f - mu)) / (1.0f - product);
    const float nadam_m = (lr * mu_next) / (1.0f - product * mu_next);
    for (int i = 0; i < len; ++i) {
      const float p0 = static_cast<float>(pin[i]);
      float g = static_cast<float>(gin[i]) * sign;
      if constexpr (L2) g = g + l2 * p0;
      float p = p0 * decay;
      const float base = from_m > 0.0f ? m[i] : g;
      const float mi = base + lerp_c1 * (g - m[i]);
      m[i] = mi;
      if constexpr (ALG == ADAMAX) {
        const float a = v[i] * beta2, b = std::fabs(g) + eps;
        const float u = (a != a) ? a : ((b != b) ? b : (a > b ? a : b));  // MLX's maximum: NaN wins
        v[i] = u;
        p = p - step_size * (mi / u);
      } else {
        const float vi = v[i] * beta2 + (b2w * g) * g;
        v[i] = vi;
        if constexpr (ALG == ADAM) {
          float second = vi;
          if constexpr (AMSGRAD) {
            const float a = w[i];
            second = (a != a) ? a : ((vi != vi) ? vi : (a > vi ? a : vi));
            w[i] = second;
          }
          const float denom = std::sqrt(second) / bc2_sqrt + eps;
          p = p - step_size * (mi / denom);
        } else {
          const float denom = std::sqrt(vi / bc2) + eps;
          p = p - nadam_g * (g / denom);
          p = p - nadam_m * (mi / denom);
        }
      }
      out[i] = p;
    }
  }

  template <typename P, typename G>
  void rule_block(const P* pin, const G* gin, float (*rows)[MAX_BLOCK], float* out, int len) const {
    const bool l2 = c[L2_] != 0.0f;
    float* w = rows[2];
#define ADAMKIT_RULE(A, S) \
  (l2 ? rule<A, S, true>(pin, gin, rows[0], rows[1], w, out, len) : rule<A, S, false>(pin, gin, rows[0], rows[1], w, out, len))
    if (algorithm == ADAMAX) return ADAMKIT_RULE(ADAMAX, false);
    if (algorithm == NADAM) return ADAMKIT_RULE(NADAM, false);
    if (amsgrad) return ADAMKIT_RULE(ADAM, true);
    return ADAMKIT_RULE(ADAM, false);
#undef ADAMKIT_RULE
  }

  template <typename P, typename G>
  uint32_t run_blocks(const P* p_in, const G* g_in, P* p_out, size_t b0, size_t b1) const {
    // scratch on the heap (~112 KiB: threads may have small stacks)
    std::vector<float> scratch(static_cast<size_t>(2 * MAX_MOMENTS + 1) * MAX_BLOCK);
    float (*rows)[MAX_BLOCK] = reinterpret_cast<float (*)[MAX_BLOCK]>(scratch.data());
    float (*old)[MAX_BLOCK] = rows + MAX_MOMENTS;
    float* newp = scratch.data() + static_cast<size_t>(2 * MAX_MOMENTS) * MAX_BLOCK;
    uint32_t masked = 0;
    const bool ok = c[OK] > 0.0f;
    for (size_t b = b0; b < b1; ++b) {
      const size_t start = b * static_cast<size_t>(block);
      const int len = static_cast<int>(std::min(static_cast<size_t>(block), n - start));
      if (!ok) {  // nonfinite="skip" decided on the device: nothing changes
        for (int i = 0; i < len; ++i) p_out[start + i] = p_in[start + i];
        for (int k = 0; k < moments; ++k) {
          const size_t bytes = books[k].bits == 8 ? len : (len + 1) / 2;
          const size_t at = books[k].bits == 8 ? start : start / 2;
          std::memcpy(codes_out[k] + at, codes_in[k] + at, bytes);
          absmax_out[k][b] = absmax_in[k][b];
        }
        continue;
      }
      for (int k = 0; k < moments; ++k) decode(k, b, len, rows[k]);
      // masking: only a block whose gradient holds a NaN, ±inf or a huge value pays for it
      bool suspect = false;
      if (mask) {
        int count = 0;
        for (int i = 0; i < len; ++i) count += !(std::fabs(static_cast<float>(g_in[start + i])) < huge);
        suspect = count > 0;
        if (suspect)
          for (int k = 0; k < moments; ++k) std::memcpy(old[k], rows[k], sizeof(float) * len);
      }
      rule_block(p_in + start, g_in + start, rows, newp, len);
      if (suspect) {
        for (int i = 0; i < len; ++i) {
          const float size = std::fabs(static_cast<float>(g_in[start + i]));
          bool fine = true;
          for (int k = 0; k < moments; ++k) fine = fine && finite(rows[k][i]);
          if (!(size < INFINITY) || (size >= huge && !fine)) {
            ++masked;
            newp[i] = static_cast<float>(p_in[start + i]);
            for (int k = 0; k < moments; ++k) rows[k][i] = old[k][i];
          }
        }
      }
      for (int i = 0; i < len; ++i) p_out[start + i] = store<P>(newp[i]);
      for (int k = 0; k < moments; ++k) encode(k, b, len, rows[k]);
    }
    return masked;
  }
};

// ------------------------------------------------------------------ the primitive
struct Attributes {
  int algorithm, moments;
  bool amsgrad, maximize, mask;
  int block, threads;
  float huge;
  std::vector<int> bits, dither, root, clamp_zero;
  std::vector<float> lowest;
  int64_t low_bits, one_bits, shift, half;

  bool operator==(const Attributes& o) const {
    return algorithm == o.algorithm && moments == o.moments && amsgrad == o.amsgrad && maximize == o.maximize &&
        mask == o.mask && block == o.block && threads == o.threads && huge == o.huge && bits == o.bits &&
        dither == o.dither && root == o.root && clamp_zero == o.clamp_zero && lowest == o.lowest &&
        low_bits == o.low_bits && one_bits == o.one_bits && shift == o.shift && half == o.half;
  }
};

// inputs: g, p, consts, t, product, then per moment: codes, absmax, then per moment its
// tables (8-bit: values, packed; 4-bit: values, rate, offset, first, threshold, slopes, cell)
constexpr int LEAD = 5;

int tables_of(int bits) {
  return bits == 8 ? 2 : 7;
}

void require(bool condition, const std::string& what) {
  if (!condition) throw std::invalid_argument("adamkit quantized step: " + what);
}

class QuantizedStep : public mx::Primitive {
 public:
  QuantizedStep(mx::Stream s, Attributes a) : mx::Primitive(s), a_(std::move(a)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    check(inputs, outputs);
    for (auto& out : outputs) out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (auto& in : inputs) encoder.set_input_array(in);
    for (auto& out : outputs) encoder.set_output_array(out);
    std::vector<mx::array> ins, outs;
    for (auto& in : inputs) ins.push_back(mx::array::unsafe_weak_copy(in));
    for (auto& out : outputs) outs.push_back(mx::array::unsafe_weak_copy(out));
    encoder.dispatch([a = a_, ins = std::move(ins), outs = std::move(outs)]() mutable { run(a, ins, outs); });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("adamkit quantized step: CPU only");
  }

  const char* name() const override {
    return "AdamkitQuantizedStep";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return a_ == static_cast<const QuantizedStep&>(other).a_;
  }

 private:
  Attributes a_;

  // the evaluated inputs and allocated outputs are what the kernel will read and write
  void check(const std::vector<mx::array>& in, const std::vector<mx::array>& out) const {
    const int m = a_.moments;
    int tables = 0;
    for (int k = 0; k < m; ++k) tables += tables_of(a_.bits[k]);
    require(static_cast<int>(in.size()) == LEAD + 2 * m + tables, "wrong number of inputs");
    require(static_cast<int>(out.size()) == 2 + 2 * m, "wrong number of outputs");
    for (auto& x : in) require(x.flags().row_contiguous && x.data_size() == x.size(), "an input is not contiguous");
    const size_t n = in[1].size();
    require(in[0].size() == n && out[0].size() == n && out[0].dtype() == in[1].dtype(), "gradient/parameter sizes");
    require(in[2].dtype() == mx::float32 && in[2].size() == N_CONSTS, "consts");
    require(in[3].dtype() == mx::uint32 && in[3].size() == 1, "step");
    require(in[4].dtype() == mx::float32 && in[4].size() == 1, "product");
    const size_t blocks = std::max<size_t>(1, (n + a_.block - 1) / a_.block);
    int at = LEAD + 2 * m;
    for (int k = 0; k < m; ++k) {
      const size_t stored = a_.bits[k] == 8 ? n : (n + 1) / 2;
      const auto& codes = in[LEAD + 2 * k];
      const auto& absmax = in[LEAD + 2 * k + 1];
      require(codes.dtype() == mx::uint8 && codes.size() == stored, "codes size");
      require(absmax.dtype() == mx::float32 && absmax.size() == blocks, "absmax size");
      require(out[1 + 2 * k].dtype() == mx::uint8 && out[1 + 2 * k].size() == stored, "output codes");
      require(out[2 + 2 * k].dtype() == mx::float32 && out[2 + 2 * k].size() == blocks, "output absmax");
      if (a_.bits[k] == 8) {
        require(in[at].dtype() == mx::float32 && in[at].size() == 256, "8-bit values");
        require(in[at + 1].dtype() == mx::int32 && in[at + 1].size() == static_cast<size_t>(2 * a_.half), "8-bit table");
      } else {
        require(in[at].dtype() == mx::float32 && in[at].size() == 16, "4-bit values");
        const size_t sizes[6] = {16, 16, 32, 32, 32, 2};
        const mx::Dtype types[6] = {mx::float32, mx::float32, mx::int32, mx::float32, mx::float32, mx::float32};
        for (int i = 0; i < 6; ++i)
          require(in[at + 1 + i].dtype() == types[i] && in[at + 1 + i].size() == sizes[i], "4-bit tables");
      }
      at += tables_of(a_.bits[k]);
    }
    require(out.back().dtype() == mx::uint32 && out.back().size() == 1, "masked count");
  }

  template <typename P, typename G>
  static void run_typed(const Step& s, const mx::array& g, const mx::array& p, mx::array& p_out, uint32_t* masked,
                        int threads) {
    const size_t blocks = std::max<size_t>(1, (s.n + s.block - 1) / s.block);
    const P* pin = p.data<P>();
    const G* gin = g.data<G>();
    P* pout = p_out.data<P>();
    if (s.n == 0) {
      *masked = 0;
      return;
    }
    const size_t workers = std::max<size_t>(1, std::min<size_t>(threads, blocks / 64));
    if (workers == 1) {
      *masked = s.run_blocks<P, G>(pin, gin, pout, 0, blocks);
      return;
    }
    std::vector<uint32_t> counts(workers, 0);
    std::vector<std::thread> pool;
    const size_t per = (blocks + workers - 1) / workers;
    for (size_t w = 1; w < workers; ++w) {
      const size_t b0 = std::min(blocks, w * per), b1 = std::min(blocks, (w + 1) * per);
      try {
        pool.emplace_back([&, w, b0, b1] { counts[w] = s.run_blocks<P, G>(pin, gin, pout, b0, b1); });
      } catch (const std::system_error&) {  // no thread to be had: this one does the range
        counts[w] = s.run_blocks<P, G>(pin, gin, pout, b0, b1);
      }
    }
    counts[0] = s.run_blocks<P, G>(pin, gin, pout, 0, std::min(blocks, per));
    for (auto& th : pool) th.join();
    uint32_t total = 0;
    for (auto c : counts) total += c;
    *masked = total;
  }

  template <typename P>
  static void run_p(const Step& s, const mx::array& g, const mx::array& p, mx::array& p_out, uint32_t* masked,
                    int threads) {
    switch (g.dtype()) {
      case mx::float32: return run_typed<P, float>(s, g, p, p_out, masked, threads);
      case mx::bfloat16: return run_typed<P, mx::bfloat16_t>(s, g, p, p_out, masked, threads);
      case mx::float16: return run_typed<P, mx::float16_t>(s, g, p, p_out, masked, threads);
      default: throw std::invalid_argument("adamkit quantized step: gradient dtype");
    }
  }

  static void run(const Attributes& a, std::vector<mx::array>& in, std::vector<mx::array>& out) {
    Step s{};
    s.algorithm = a.algorithm;
    s.moments = a.moments;
    s.amsgrad = a.amsgrad;
    s.maximize = a.maximize;
    s.mask = a.mask;
    s.n = in[1].size();
    s.block = a.block;
    s.huge = a.huge;
    s.layout = {static_cast<uint32_t>(a.low_bits), static_cast<uint32_t>(a.one_bits), static_cast<int>(a.shift),
                static_cast<uint32_t>(a.half)};
    s.c = in[2].data<float>();
    s.t = in[3].data<uint32_t>()[0];
    s.product = in[4].data<float>()[0];
    int at = LEAD + 2 * a.moments;
    for (int k = 0; k < a.moments; ++k) {
      Book& bk = s.books[k];
      bk.bits = a.bits[k];
      bk.dither = a.dither[k] != 0;
      bk.root = a.root[k] != 0;
      bk.clamp_zero = a.clamp_zero[k] != 0;
      bk.lowest = a.lowest[k];
      bk.values = in[at].data<float>();
      if (bk.bits == 8) {
        bk.packed = in[at + 1].data<int32_t>();
      } else {
        bk.rate = in[at + 1].data<float>();
        bk.offset = in[at + 2].data<float>();
        bk.first = in[at + 3].data<int32_t>();
        bk.threshold = in[at + 4].data<float>();
        bk.slopes = in[at + 5].data<float>();
        bk.cell = in[at + 6].data<float>();
      }
      at += tables_of(bk.bits);
      s.codes_in[k] = in[LEAD + 2 * k].data<uint8_t>();
      s.absmax_in[k] = in[LEAD + 2 * k + 1].data<float>();
      s.codes_out[k] = out[1 + 2 * k].data<uint8_t>();
      s.absmax_out[k] = out[2 + 2 * k].data<float>();
    }
    uint32_t* masked = out.back().data<uint32_t>();
    switch (in[1].dtype()) {
      case mx::float32: return run_p<float>(s, in[0], in[1], out[0], masked, a.threads);
      case mx::bfloat16: return run_p<mx::bfloat16_t>(s, in[0], in[1], out[0], masked, a.threads);
      case mx::float16: return run_p<mx::float16_t>(s, in[0], in[1], out[0], masked, a.threads);
      default: throw std::invalid_argument("adamkit quantized step: parameter dtype");
    }
  }
};

bool float_dtype(mx::Dtype d) {
  return d == mx::float32 || d == mx::bfloat16 || d == mx::float16;
}

// The Python entry point: checks the arguments, makes every input contiguous on the CPU
// stream, and returns [p, codes_0, absmax_0, ..., masked].
std::vector<mx::array> quantized_step(const mx::array& g, const mx::array& p, const mx::array& consts,
                                      const mx::array& t, const mx::array& product,
                                      const std::vector<mx::array>& state, const std::vector<mx::array>& tables,
                                      int algorithm, bool amsgrad, bool maximize, bool mask, int block, int threads,
                                      float huge, const std::vector<int>& bits, const std::vector<int>& dither,
                                      const std::vector<int>& root, const std::vector<int>& clamp_zero,
                                      const std::vector<float>& lowest, const std::vector<int64_t>& layout) {
  const int m = static_cast<int>(bits.size());
  require(algorithm >= ADAM && algorithm <= NADAM, "algorithm");
  const int expected = algorithm == ADAM ? (amsgrad ? 3 : 2) : 2;
  require(m == expected, "moments for this algorithm");
  require(dither.size() == bits.size() && root.size() == bits.size() && clamp_zero.size() == bits.size() &&
              lowest.size() == bits.size(), "codebook attributes");
  // the encoder table's index is at most ((one - low) >> shift) + half, inside the table's
  // 2 * half entries exactly when half is that count plus one (the packed table's size is
  // checked against 2 * half below)
  require(layout.size() == 4 && layout[0] >= 0 && layout[0] < layout[1] && layout[1] <= 0x7F800000 &&
              layout[2] >= 0 && layout[2] < 32 && layout[3] == ((layout[1] - layout[0]) >> layout[2]) + 1 &&
              layout[3] <= (1 << 24),
          "encoder layout");
  require(block >= 2 && block <= MAX_BLOCK && block % 2 == 0, "block size");
  require(threads >= 1 && threads <= 256, "threads");
  for (int k = 0; k < m; ++k) {
    require(bits[k] == 8 || bits[k] == 4, "bits");
    require(bits[k] == 8 ? dither[k] == 0 : dither[k] != 0, "4-bit codes are dithered, 8-bit ones nearest");
  }
  require(float_dtype(p.dtype()) && float_dtype(g.dtype()), "parameter and gradient dtypes");
  require(p.size() == g.size(), "gradient and parameter sizes");
  require(p.size() > 0 && p.size() < (size_t{1} << 31), "parameter size (1 to 2^31 - 1 elements)");
  require(static_cast<int>(state.size()) == 2 * m, "state entries");
  int n_tables = 0;
  for (int k = 0; k < m; ++k) n_tables += tables_of(bits[k]);
  require(static_cast<int>(tables.size()) == n_tables, "tables");
  const size_t n = p.size();
  const size_t blocks = std::max<size_t>(1, (n + block - 1) / block);
  for (int k = 0; k < m; ++k) {
    const size_t stored = bits[k] == 8 ? n : (n + 1) / 2;
    require(state[2 * k].dtype() == mx::uint8 && state[2 * k].size() == stored, "codes size");
    require(state[2 * k + 1].dtype() == mx::float32 && state[2 * k + 1].size() == blocks, "absmax size");
  }
  auto s = mx::default_stream(mx::Device::cpu);
  auto flat = [&](const mx::array& x) { return mx::contiguous(mx::reshape(x, {-1}, s), false, s); };
  std::vector<mx::array> inputs = {flat(g), flat(p), flat(consts), flat(t), flat(product)};
  for (auto& x : state) inputs.push_back(flat(x));
  for (auto& x : tables) inputs.push_back(flat(x));
  Attributes a{algorithm, m, amsgrad, maximize, mask, block, threads, huge, bits, dither, root, clamp_zero, lowest,
               layout[0], layout[1], layout[2], layout[3]};
  std::vector<mx::Shape> shapes = {p.shape()};
  std::vector<mx::Dtype> dtypes = {p.dtype()};
  for (int k = 0; k < m; ++k) {
    shapes.push_back({static_cast<int>(bits[k] == 8 ? n : (n + 1) / 2)});
    dtypes.push_back(mx::uint8);
    shapes.push_back({static_cast<int>(blocks)});
    dtypes.push_back(mx::float32);
  }
  shapes.push_back({});
  dtypes.push_back(mx::uint32);
  return mx::array::make_arrays(std::move(shapes), std::move(dtypes), std::make_shared<QuantizedStep>(s, a), inputs);
}

}  // namespace

NB_MODULE(adamkit_mlx_native, m) {
  using namespace nb::literals;
  m.def("quantized_step", &quantized_step, "g"_a, "p"_a, "consts"_a, "t"_a, "product"_a, "state"_a, "tables"_a,
        nb::kw_only(), "algorithm"_a, "amsgrad"_a, "maximize"_a, "mask"_a, "block"_a, "threads"_a, "huge"_a, "bits"_a,
        "dither"_a, "root"_a, "clamp_zero"_a, "lowest"_a, "layout"_a);
  m.attr("MAX_BLOCK") = MAX_BLOCK;
}
