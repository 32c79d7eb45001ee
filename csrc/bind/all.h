// Every op family's bindings; each module instantiates them for its back-end tag.
#pragma once

#include <type_traits>

#include "conv.h"
#include "conv_net.h"
#include "core.h"
#include "drift.h"
#include "flowacc.h"
#include "norm.h"
#include "sparse.h"

namespace hf {

template <class Tag>
void bind_all(pybind11::module_& m) {
  bind_conv<Tag>(m);
  if constexpr (std::is_same_v<Tag, CpuTag>) bind_conv_net<Tag>(m);
  bind_core<Tag>(m);
  bind_drift<Tag>(m);
  bind_flowacc<Tag>(m);
  bind_norm<Tag>(m);
  bind_sparse<Tag>(m);
}

}  // namespace hf
