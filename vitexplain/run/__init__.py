"""Running a request: the record (:mod:`.request`, :mod:`.options`), the data path (:mod:`.loader`,
:mod:`.pipeline`), a whole run (:mod:`.job`) and the process around it (:mod:`.runtime`,
:mod:`.allocator`, :mod:`.openmp`, :mod:`.interrupts`, :mod:`.profiling`)."""
