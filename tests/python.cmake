# Optional round trips through Hugging Face PEFT (ctest label `python`). Added only when PEFT_PYTHON names
# the python of a virtual environment with torch, peft and safetensors (tests/reference/requirements.txt):
#
#   cmake -S . -B build -DPEFT_PYTHON=/path/to/venv/bin/python && cmake --build build
#   ctest --test-dir build -L python
#
#   C++ -> PEFT  python.cpp_checkpoints.export   test_pretrained "[.export]" changes every adapter tensor of each
#                                                golden case in C++ (noise, then three gradient steps), saves it with
#                                                save_pretrained and records the C++ outputs and merged weights
#                python.cpp_checkpoints.check    check_cpp_checkpoints.py: PeftModel.from_pretrained on each (no
#                                                missing/unexpected keys), outputs and merge_and_unload() compared
#                python.cpp_combine.<case>       `peft combine` writes five combined adapters
#                python.cpp_combine.check        check_cpp_combine.py: PEFT loads them and reproduces its own
#                                                add_weighted_adapter's outputs
#   PEFT -> C++  python.golden.generate          gen_checkpoints.py regenerates the golden checkpoints with the
#                                                environment's PEFT into the build tree
#                python.golden.load              test_pretrained's golden-checkpoint test on those files
#                                                (PEFT_GOLDEN_CHECKPOINT_DIR)
#   both ways    python.cpp_checkpoints_more.*   the same for AdaLoRA, VeRA and modules_to_save (test_pretrained_more,
#                python.golden_more.*            check_cpp_checkpoints_more.py, gen_checkpoints_adalora_vera.py)
# Each check script exits non-zero on any mismatch.
set(PEFT_PYTHON "" CACHE FILEPATH "Python of a virtual environment with torch, peft and safetensors; enables the `python` ctests")
if(NOT PEFT_PYTHON)
  return()
endif()
if(NOT EXISTS "${PEFT_PYTHON}")
  message(FATAL_ERROR "peft: PEFT_PYTHON='${PEFT_PYTHON}' does not exist")
endif()
message(STATUS "peft: python round-trip tests enabled with ${PEFT_PYTHON}")

set(_py_ref ${CMAKE_CURRENT_SOURCE_DIR}/reference)
set(_py_out ${CMAKE_CURRENT_BINARY_DIR}/python)

# Both ways for one test executable: C++ -> PEFT (its "[.export]" cases write adapters with save_pretrained,
# check_py loads them in PeftModel.from_pretrained and compares) and PEFT -> C++ (gen_py regenerates the golden
# checkpoints with the environment's PEFT, its "[reference]" cases load them). Tests python.cpp_checkpoints<tag>.*
# and python.golden<tag>.*.
function(_peft_python_round_trip tag test_target check_py gen_py)
  set(c python.cpp_checkpoints${tag})
  set(g python.golden${tag})
  add_test(NAME ${c}.export
    COMMAND ${CMAKE_COMMAND} -E env PEFT_PRETRAINED_EXPORT_DIR=${_py_out}/cpp_checkpoints${tag} $<TARGET_FILE:${test_target}> --warn NoTests "[.export]")
  set_tests_properties(${c}.export PROPERTIES LABELS python FIXTURES_SETUP peft_py_cpp_checkpoints${tag})
  add_test(NAME ${c}.check COMMAND ${PEFT_PYTHON} ${_py_ref}/${check_py} ${_py_out}/cpp_checkpoints${tag})
  set_tests_properties(${c}.check PROPERTIES LABELS python FIXTURES_REQUIRED peft_py_cpp_checkpoints${tag} TIMEOUT 600)
  add_test(NAME ${g}.generate
    COMMAND ${CMAKE_COMMAND} -E env OMP_NUM_THREADS=1 ${PEFT_PYTHON} ${_py_ref}/${gen_py} --out ${_py_out}/golden${tag})
  set_tests_properties(${g}.generate PROPERTIES LABELS python FIXTURES_SETUP peft_py_golden${tag} TIMEOUT 600)
  add_test(NAME ${g}.load
    COMMAND ${CMAKE_COMMAND} -E env PEFT_GOLDEN_CHECKPOINT_DIR=${_py_out}/golden${tag} $<TARGET_FILE:${test_target}> --warn NoTests "[reference]")
  set_tests_properties(${g}.load PROPERTIES LABELS python FIXTURES_REQUIRED peft_py_golden${tag})
endfunction()
_peft_python_round_trip("" test_pretrained check_cpp_checkpoints.py gen_checkpoints.py)
# AdaLoRA (truncating rank_pattern), VeRA (shared projections) and modules_to_save
_peft_python_round_trip(_more test_pretrained_more check_cpp_checkpoints_more.py gen_checkpoints_adalora_vera.py)

# C++ -> PEFT: adapters written by `peft combine` (the command-line program is defined after tests/, so these
# are added at the end of the top-level directory, and only if it is built)
function(_peft_python_combine_tests)
  if(NOT TARGET peft_cli)
    message(STATUS "peft: the `peft` program is not built; python.cpp_combine.* skipped")
    return()
  endif()
  set(ref ${PROJECT_SOURCE_DIR}/tests/reference)
  set(a ${ref}/checkpoints/combine/adapters)
  set(o ${PROJECT_BINARY_DIR}/tests/python/cpp_combine)
  # one case per entry: "name,arg,arg,..." (the arguments of `peft combine` before --out)
  set(abc "--adapter,${a}/t1:1.0,--adapter,${a}/t2:0.6,--adapter,${a}/t3:-0.4")
  foreach(c IN ITEMS
      "exact,${abc},--method,linear,--exact"
      "svd,${abc},--method,svd"
      "ties,${abc},--method,ties,--density,0.5"
      "rslora_svd,--adapter,${a}/rs1:1.0,--adapter,${a}/rs2:0.5,--method,svd"
      "cat_ranks,--adapter,${a}/m2:0.7,--adapter,${a}/m4:-1.1,--method,cat")
    string(REPLACE "," ";" args "${c}")
    list(POP_FRONT args name)
    add_test(NAME python.cpp_combine.${name}
      COMMAND sh -c "out=\"$1\"; shift; rm -rf \"$out\" && \"$@\" --out \"$out\"" sh ${o}/${name}
        $<TARGET_FILE:peft_cli> combine ${args})
    set_tests_properties(python.cpp_combine.${name} PROPERTIES LABELS python FIXTURES_SETUP peft_py_combine)
  endforeach()
  add_test(NAME python.cpp_combine.check COMMAND ${PEFT_PYTHON} ${ref}/check_cpp_combine.py ${o})
  set_tests_properties(python.cpp_combine.check PROPERTIES LABELS python FIXTURES_REQUIRED peft_py_combine TIMEOUT 600)
endfunction()
cmake_language(DEFER DIRECTORY ${PROJECT_SOURCE_DIR} CALL _peft_python_combine_tests)
