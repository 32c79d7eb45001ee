// Every op family's bindings; each module instantiates them for its back-end tag.
#pragma once

#include "core.h"

namespace hf {

template <class Tag>
void bind_all(pybind11::module_& m) {
  bind_core<Tag>(m);
}

}  // namespace hf
