# libplugin_TCPX.so, the NIXL backend plugin, and the command that points NIXL at it.
#
# The plugin builds against nixl/nixl_abi.h (this project's declaration of NIXL's backend
# interface), so no NIXL tree or library is needed: it links to libuccl_tcpx.so.0 alone, with
# -z defs proving that. NIXL's class layout changes between releases while its plugin API number
# does not, so the plugin is installed once per NIXL version the header reproduces, under
# <libdir>/uccl-tcpx/nixl/<version>/, where uccl-tcpx-nixl-plugin-dir looks for the version it finds.
#
# Included by cmake/CMakeLists.txt after the uccl_tcpx_prebuilt target and _uccl_includes exist.
option(UCCL_TCPX_NIXL_PLUGIN "Build the NIXL backend plugin libplugin_TCPX.so" ON)
if(UCCL_TCPX_NIXL_PLUGIN)
  set(_nixl_dir "${CMAKE_CURRENT_LIST_DIR}")
  file(STRINGS "${_nixl_dir}/nixl_abi.h" _nixl_line REGEX "^#define UCCL_TCPX_NIXL_VERSIONS ")
  if(NOT _nixl_line MATCHES "\"([0-9. ]+)\"")
    message(FATAL_ERROR "no UCCL_TCPX_NIXL_VERSIONS in ${_nixl_dir}/nixl_abi.h")
  endif()
  separate_arguments(UCCL_TCPX_NIXL_VERSIONS UNIX_COMMAND "${CMAKE_MATCH_1}")

  add_library(nixl_plugin_tcpx MODULE "${_nixl_dir}/tcpx_backend.cpp")
  target_include_directories(nixl_plugin_tcpx PRIVATE "${_uccl_includes}" "${_nixl_dir}")
  target_compile_features(nixl_plugin_tcpx PRIVATE cxx_std_20)
  target_compile_definitions(nixl_plugin_tcpx PRIVATE UCCL_TCPX_PLUGIN_VERSION="${PROJECT_VERSION}")
  target_compile_options(nixl_plugin_tcpx PRIVATE -Wall -Wextra -Werror)
  target_link_libraries(nixl_plugin_tcpx PRIVATE uccl_tcpx_prebuilt)
  target_link_options(nixl_plugin_tcpx PRIVATE "-Wl,--version-script=${_nixl_dir}/exports.map" -Wl,-z,defs)
  set_target_properties(nixl_plugin_tcpx PROPERTIES
    OUTPUT_NAME "plugin_TCPX"
    PREFIX "lib"
    CXX_VISIBILITY_PRESET hidden
    VISIBILITY_INLINES_HIDDEN ON
    LINK_DEPENDS "${_nixl_dir}/exports.map"
    BUILD_RPATH "${_uccl_artifacts}"
    # $ORIGIN is the folder the plugin was opened from, symlinks not resolved: the installed
    # <libdir>/uccl-tcpx/nixl/<version>/ (whose <libdir> holds libuccl_tcpx.so.0), or the folder
    # uccl-tcpx-nixl-plugin-dir makes, which links libuccl_tcpx.so.0 beside the plugin.
    INSTALL_RPATH "$ORIGIN:$ORIGIN/../../..")
  foreach(_v IN LISTS UCCL_TCPX_NIXL_VERSIONS)
    install(TARGETS nixl_plugin_tcpx LIBRARY DESTINATION "${CMAKE_INSTALL_LIBDIR}/uccl-tcpx/nixl/${_v}")
  endforeach()
  # The same command the Python package installs as a console script.
  install(PROGRAMS "${_nixl_dir}/../python/uccl_tcpx/nixl_plugin_dir.py"
    DESTINATION "${CMAKE_INSTALL_BINDIR}" RENAME uccl-tcpx-nixl-plugin-dir)
endif()
