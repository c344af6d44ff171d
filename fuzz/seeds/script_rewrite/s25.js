'Dear @@ORG:Name@@' + `x ${@@VAR:Arg@@ + `@@STG:1,#Action@@`} y` // @@ORG:c@@
/* @@VAR:d@@ */ return 1