// Python module stub: `import l2m_fast._C` loads the shared library, whose static initialisers
// register the torch.ops.l2m_fast_cpu operators (sampler_op.cpp). The module itself has no members.
#include <Python.h>

static struct PyModuleDef l2m_fast_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&l2m_fast_c_module); }
