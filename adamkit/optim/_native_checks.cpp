// The per-step checks of a cached plan (adamkit/optim/_plan.py), through torch's C++ API.
//
// Python reads each tensor property through a getter that costs 0.1-0.45 us (20,000
// parameters: ~30 ms a step for what the plan must check); here the same reads cost a
// few nanoseconds once the tensors' metadata is in cache, and the metadata of a batch of
// parameters is brought into cache together (prefetching the addresses the API gives:
// the Python objects, their TensorImpls, autograd metadata and storages), so that the
// cache misses of many parameters overlap instead of following one another.
//
// describe(params, meta, layouts): records each parameter's scalar type, device, sizes
//   and strides (meta: int64 [n, 6]; layouts: int64, 2 * ndim per parameter).
// check(params, types, meta, layouts, pptrs, gptrs, active) -> int:
//   0: every parameter is still a plain tensor of `types` with the recorded scalar type,
//      device, sizes and strides (strides of size-1 dimensions aside) and storage holding
//      its elements; every gradient either undefined or a dense tensor with the same
//      scalar type, device, sizes and strides and storage holding its elements. pptrs
//      and gptrs (int64 [n]) get their element addresses, active (uint8 [n]) whether a
//      gradient is there.
//   1: a parameter changed (the plan is rebuilt).
//   2: a gradient the plan cannot take (the general path explains it).
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

namespace {

constexpr Py_ssize_t kDistance = 32;  // parameters between the pipeline's stages
constexpr int64_t kMetaColumns = 6;  // scalar type, device type, device index, ndim, numel, layout offset

struct Buffer {
  Py_buffer view{};
  bool held = false;
  ~Buffer() {
    if (held) PyBuffer_Release(&view);
  }
  bool get(PyObject* obj, Py_ssize_t itemsize, Py_ssize_t count, bool writable) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &view, flags) != 0) return false;
    held = true;
    if (view.itemsize != itemsize || view.len < count * itemsize) {
      PyErr_SetString(PyExc_ValueError, "adamkit native checks: a buffer of the wrong size or type");
      return false;
    }
    return true;
  }
  template <typename T>
  T* data() const {
    return static_cast<T*>(view.buf);
  }
};

inline void prefetch(const void* p) {
  __builtin_prefetch(p, 0, 3);
}

// A TensorImpl's first lines: what the checks read of it.
inline void prefetch_lines(const c10::TensorImpl* t) {
  const char* base = reinterpret_cast<const char*>(t);
  for (int line = 0; line < 4; ++line) prefetch(base + 64 * line);
}

// The TensorImpl of a Python tensor, or nullptr if the object is not one.
inline c10::TensorImpl* impl_of(PyObject* obj) {
  if (!THPVariable_Check(obj)) return nullptr;
  return THPVariable_Unpack(obj).unsafeGetTensorImpl();
}

bool same_layout(const c10::TensorImpl* t, const int64_t* sizes, const int64_t* strides, int64_t ndim) {
  if (t->dim() != ndim) return false;
  auto sz = t->sizes();
  auto st = t->strides();
  for (int64_t d = 0; d < ndim; ++d) {
    if (sz[d] != sizes[d]) return false;
    if (sizes[d] != 1 && st[d] != strides[d]) return false;
  }
  return true;
}

// The address of the first element, if the storage holds all `numel` of them from the
// tensor's offset (a dense tensor spans numel elements); -1 if not.
int64_t address(const c10::TensorImpl* t, int64_t numel) {
  if (!t->has_storage() || t->is_python_dispatch()) return -1;
  if (numel == 0) return 0;
  const c10::Storage& storage = t->unsafe_storage();
  const char* base = static_cast<const char*>(storage.data());
  const int64_t itemsize = static_cast<int64_t>(t->itemsize());
  const int64_t offset = t->storage_offset();
  if (base == nullptr || offset < 0) return -1;
  if ((offset + numel) * itemsize > static_cast<int64_t>(storage.nbytes())) return -1;
  return reinterpret_cast<int64_t>(base + offset * itemsize);
}

bool plain(const c10::TensorImpl* t) {
  return t->layout() == c10::kStrided && !t->is_python_dispatch() && !t->is_nested() && t->has_storage();
}

// The gradients' storages a check passed, kept alive until the step is done: another
// Python thread may drop a gradient while the kernels, which release the GIL, read it
// (torch's step holds its gradients too; a parameter is held by its group).
constexpr const char* kHeld = "adamkit.native_checks.held";

void free_held(PyObject* capsule) {
  delete static_cast<std::vector<c10::Storage>*>(PyCapsule_GetPointer(capsule, kHeld));
}

const c10::TensorImpl* grad_of(const c10::TensorImpl* t) {
  const c10::AutogradMetaInterface* meta = t->autograd_meta();
  if (meta == nullptr) return nullptr;
  const at::Tensor& g = meta->grad();
  return g.defined() ? g.unsafeGetTensorImpl() : nullptr;
}

PyObject* describe(PyObject*, PyObject* args) {
  PyObject *params, *meta_obj, *layouts_obj;
  if (!PyArg_ParseTuple(args, "O!OO", &PyList_Type, &params, &meta_obj, &layouts_obj)) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(params);
  Py_ssize_t total = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const c10::TensorImpl* t = impl_of(PyList_GET_ITEM(params, i));
    if (t == nullptr || !plain(t)) {
      PyErr_SetString(PyExc_ValueError, "adamkit native checks: describe() takes plain dense tensors");
      return nullptr;
    }
    total += 2 * t->dim();
  }
  Buffer meta, layouts;
  if (!meta.get(meta_obj, 8, kMetaColumns * n, true) || !layouts.get(layouts_obj, 8, total, true)) return nullptr;
  int64_t* m = meta.data<int64_t>();
  int64_t* l = layouts.data<int64_t>();
  int64_t offset = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const c10::TensorImpl* t = impl_of(PyList_GET_ITEM(params, i));
    const int64_t ndim = t->dim();
    int64_t* row = m + kMetaColumns * i;
    row[0] = static_cast<int64_t>(t->dtype().toScalarType());
    row[1] = static_cast<int64_t>(t->device_type());
    row[2] = static_cast<int64_t>(t->device().index());
    row[3] = ndim;
    row[4] = t->numel();
    row[5] = offset;
    for (int64_t d = 0; d < ndim; ++d) {
      l[offset + d] = t->sizes()[d];
      l[offset + ndim + d] = t->strides()[d];
    }
    offset += 2 * ndim;
  }
  Py_RETURN_NONE;
}

PyObject* check(PyObject*, PyObject* args) {
  PyObject *params, *types, *meta_obj, *layouts_obj, *pptrs_obj, *gptrs_obj, *active_obj;
  if (!PyArg_ParseTuple(args, "O!O!OOOOO", &PyList_Type, &params, &PyTuple_Type, &types, &meta_obj, &layouts_obj,
                        &pptrs_obj, &gptrs_obj, &active_obj)) {
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(params);
  Buffer meta, layouts, pptrs, gptrs, active;
  if (!meta.get(meta_obj, 8, kMetaColumns * n, false) || !pptrs.get(pptrs_obj, 8, n, true) ||
      !gptrs.get(gptrs_obj, 8, n, true) || !active.get(active_obj, 1, n, true)) {
    return nullptr;
  }
  const int64_t* m = meta.data<int64_t>();
  Py_ssize_t total = 0;
  for (Py_ssize_t i = 0; i < n; ++i) total = std::max<Py_ssize_t>(total, m[kMetaColumns * i + 5] + 2 * m[kMetaColumns * i + 3]);
  if (!layouts.get(layouts_obj, 8, total, false)) return nullptr;
  const int64_t* l = layouts.data<int64_t>();
  int64_t* pp = pptrs.data<int64_t>();
  int64_t* gp = gptrs.data<int64_t>();
  uint8_t* act = active.data<uint8_t>();
  const Py_ssize_t n_types = PyTuple_GET_SIZE(types);
  int status = 0;
  auto held = std::make_unique<std::vector<c10::Storage>>();
  try {
    held->reserve(n);
    // A software pipeline: while parameter i is checked, the metadata of the next ones
    // is on its way, a level per stage (object, TensorImpl, autograd metadata and
    // storage, gradient's TensorImpl, gradient's storage), kDistance parameters apart.
    std::vector<const c10::TensorImpl*> impls(n, nullptr), grads(n, nullptr);
    for (Py_ssize_t i = 0; i < n + 5 * kDistance && status == 0; ++i) {
      if (i < n) prefetch(PyList_GET_ITEM(params, i));
      if (Py_ssize_t j = i - kDistance; j >= 0 && j < n) {
        PyObject* obj = PyList_GET_ITEM(params, j);
        bool known = false;
        for (Py_ssize_t t = 0; t < n_types; ++t) known |= reinterpret_cast<PyObject*>(Py_TYPE(obj)) == PyTuple_GET_ITEM(types, t);
        if (!known) {
          status = 1;
          break;
        }
        impls[j] = THPVariable_Unpack(obj).unsafeGetTensorImpl();  // types: tensor types only
        prefetch_lines(impls[j]);
      }
      if (Py_ssize_t j = i - 2 * kDistance; j >= 0 && j < n) {
        if (impls[j]->autograd_meta() != nullptr) prefetch(impls[j]->autograd_meta());
        if (impls[j]->has_storage()) prefetch(impls[j]->unsafe_storage().unsafeGetStorageImpl());
      }
      if (Py_ssize_t j = i - 3 * kDistance; j >= 0 && j < n) {
        grads[j] = grad_of(impls[j]);
        if (grads[j] != nullptr) prefetch_lines(grads[j]);
      }
      if (Py_ssize_t j = i - 4 * kDistance; j >= 0 && j < n) {
        if (grads[j] != nullptr && grads[j]->has_storage()) prefetch(grads[j]->unsafe_storage().unsafeGetStorageImpl());
      }
      const Py_ssize_t j = i - 5 * kDistance;
      if (j < 0 || j >= n) continue;
      const int64_t* row = m + kMetaColumns * j;
      const auto scalar_type = static_cast<c10::ScalarType>(row[0]);
      const auto device_type = static_cast<c10::DeviceType>(row[1]);
      const int64_t device_index = row[2], ndim = row[3], numel = row[4];
      const int64_t* sizes = l + row[5];
      const int64_t* strides = sizes + ndim;
      const c10::TensorImpl* p = impls[j];
      if (!plain(p) || p->dtype().toScalarType() != scalar_type || p->device_type() != device_type ||
          p->device().index() != device_index || !same_layout(p, sizes, strides, ndim)) {
        status = 1;
        break;
      }
      pp[j] = address(p, numel);
      if (pp[j] < 0) {
        status = 1;
        break;
      }
      const c10::TensorImpl* g = grads[j];
      act[j] = g != nullptr;
      gp[j] = 0;
      if (g == nullptr) continue;
      if (!plain(g) || g->dtype().toScalarType() != scalar_type || g->device_type() != device_type ||
          g->device().index() != device_index || !same_layout(g, sizes, strides, ndim)) {
        status = 2;
        break;
      }
      gp[j] = address(g, numel);
      if (gp[j] < 0) {
        status = 2;
        break;
      }
      held->push_back(g->storage());
    }
  } catch (const std::exception&) {  // anything torch refuses: the general path explains it
    status = 2;
  }
  if (status != 0) return Py_BuildValue("(iO)", status, Py_None);
  PyObject* capsule = PyCapsule_New(held.get(), kHeld, free_held);
  if (capsule == nullptr) return nullptr;
  held.release();
  return Py_BuildValue("(iN)", status, capsule);
}

PyMethodDef methods[] = {
    {"describe", describe, METH_VARARGS, "Record parameters' scalar types, devices, sizes and strides."},
    {"check", check, METH_VARARGS, "Check parameters and gradients against describe()'s record: (status, storages held)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "adamkit_native_checks", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_adamkit_native_checks(void) {
  return PyModule_Create(&module);
}
